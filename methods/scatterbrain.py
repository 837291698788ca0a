"""Scatterbrain: a sparse (LSH or local) plus low-rank (Performer) estimate of attention.

Chen, Dao, Winsor, Song, Rudra and Ré, "Scatterbrain: Unifying Sparse and Low-rank
Attention Approximation" (NeurIPS 2021, arXiv 2110.15343), Sec. 3.2 and Alg. 1.

With the Performer's positive random features phi (Choromanski et al. 2021; the feature map
of ``methods.performer``: phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m), x' = x / d^(1/4), W the
orthogonal Gaussian projection drawn by ``methods.performer.orthogonal_gaussian``), the
unnormalised attention matrix exp(Q K^T / sqrt(d)) is estimated as

    L   = phi(Q) phi(K)^T                                   low rank, everywhere
    S   = [exp(q_i . k_j / sqrt(d)) - phi(q_i) . phi(k_j)]_(i,j) in Sup,  0 elsewhere
    A~  = L + S                                             (Alg. 1)
    o_i = sum_j A~_ij v_j / sum_j A~_ij

so on the sparse support Sup the estimate is exact (the low-rank part is not counted twice:
S subtracts it), and elsewhere it is the Performer's. The support is the pairs that share a
bucket of angular LSH in any of ``num_hashes`` rounds (the paper's Reformer-style hashing:
h(x) = argmax([x R; -x R]), R [d, b/2] Gaussian, the same for queries and keys), or with
``sparse=local`` the pairs within ``local_window`` positions (the fly repository's
``SBLocalAttention``, the authors' code for their long-range experiments). All weights are
positive (phi is), so A~ 1 > 0 wherever a key is allowed.

Causal (j <= i, end-aligned) and non-causal; padded keys get weight 0. Numerics: each row is
scaled by exp(-r_i) with r_i the larger of its largest exact score and its largest
log-feature product bound, so neither term overflows (the scale cancels in the ratio); fp32
(fp64 for fp64 inputs). The reference materialises the [Tq, Tk] estimate: it measures the
approximation's quality, not its speed (``real_kernel`` is False). A decode step is a row of
the same estimate over the cache (no recurrent state: the sparse part needs the keys).
"""
from __future__ import annotations

import math

import torch

from methods import masks
from methods.base import AttentionMethod, Cost, dense_flops, repeat_kv
from methods.performer import orthogonal_gaussian

SPARSE = ("lsh", "local")


class Scatterbrain(AttentionMethod):
    name = "scatterbrain"
    # what the README's method table says (python -m analysis.readme)
    paper = "Chen et al. 2021"
    kind = "sparse + low-rank"
    official_test = None
    trainable = True  # trained models adapt to the estimate (it has no weights of its own)
    training_free = False
    supports_decode = True

    def __init__(self, num_features: int = 256, sparse: str = "lsh", num_buckets: int = 8, num_hashes: int = 1,
                 local_window: int = 128, feature_seed: int = 0, hash_seed: int = 0, **structural):
        super().__init__(**structural)
        if sparse not in SPARSE:
            raise ValueError(f"Scatterbrain: sparse must be one of {SPARSE}, got {sparse!r}")
        if num_features < 1:
            raise ValueError(f"Scatterbrain: num_features must be >= 1, got {num_features}")
        if num_buckets < 2 or num_buckets % 2:
            raise ValueError(f"Scatterbrain: num_buckets must be even and >= 2 (angular LSH), got {num_buckets}")
        if num_hashes < 1 or local_window < 1:
            raise ValueError("Scatterbrain: num_hashes and local_window must be >= 1")
        self.num_features, self.sparse, self.num_buckets = num_features, sparse, num_buckets
        self.num_hashes, self.local_window = num_hashes, local_window
        g = torch.Generator().manual_seed(feature_seed * 1_000_003)
        self.register_buffer("projection", orthogonal_gaussian(num_features, self.head_dim, g).float())
        g = torch.Generator().manual_seed(hash_seed)
        rot = torch.randn(num_hashes, self.num_heads, self.head_dim, num_buckets // 2, generator=g)
        self.register_buffer("rotations", rot)

    @property
    def real_kernel(self) -> bool:
        return False  # the reference materialises the T x T estimate

    def buckets(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, d] -> [R, B, H, T] bucket ids of angular LSH, one row per hash round."""
        p = torch.einsum("bhtd,rhdn->rbhtn", x.to(self.rotations.dtype), self.rotations)
        return torch.cat([p, -p], -1).argmax(-1)

    def support(self, q, k, causal) -> torch.Tensor:
        """[B, H, Tq, Tk] bool: the pairs computed exactly (k already repeated to H heads)."""
        tq, tk = q.shape[2], k.shape[2]
        if self.sparse == "local":
            i = torch.arange(tq, device=q.device).view(-1, 1) + tk - tq
            j = torch.arange(tk, device=q.device).view(1, -1)
            return ((i - j).abs() < self.local_window).expand(q.shape[0], q.shape[1], tq, tk)
        bq, bk = self.buckets(q), self.buckets(k)
        return (bq.unsqueeze(-1) == bk.unsqueeze(-2)).any(0)

    def log_features(self, x: torch.Tensor, dt) -> torch.Tensor:
        """log phi(x) of the Performer's positive features: [B, H, T, m]."""
        x = x.to(dt) * self.head_dim ** -0.25
        return x @ self.projection.to(dt).T - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(self.num_features)

    def weights(self, q, k, causal, key_padding_mask=None) -> torch.Tensor:
        """The estimate A~ (each row scaled by its own positive factor): [B, H, Tq, Tk]."""
        B, H, tq, D = q.shape
        tk = k.shape[2]
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        k = repeat_kv(k, H // k.shape[1])
        sup = self.support(q, k, causal)
        allowed = masks.attention_mask(B, 1, tq, tk, causal, key_padding_mask, device=q.device)
        if allowed is not None:
            sup = sup & allowed
        s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) / math.sqrt(D)  # exact scores
        lq, lk = self.log_features(q, dt), self.log_features(k, dt)
        a = lq.amax(-1, keepdim=True)  # [B, H, Tq, 1]
        c = lk.amax(dim=(-1, -2), keepdim=True)  # [B, H, 1, 1]
        r = torch.maximum(a + c, s.masked_fill(~sup, float("-inf")).amax(-1, keepdim=True))
        low = torch.exp(lq - a) @ torch.exp(lk - c).transpose(-1, -2) * torch.exp(a + c - r)
        w = torch.where(sup, torch.exp(s - r), low)  # L + S: exact on the support
        if allowed is not None:
            w = w * allowed
        return w

    def attend(self, q, k, v, causal, key_padding_mask):
        w = self.weights(q, k, causal, key_padding_mask)
        vv = repeat_kv(v, q.shape[1] // v.shape[1]).to(w.dtype)
        return ((w @ vv) / w.sum(-1, keepdim=True).clamp_min(1e-30)).to(q.dtype)

    def decode(self, q, k, v) -> torch.Tensor:
        """A decode step: the newest queries' rows of the estimate over the cache (causal)."""
        return self.attend(q, k, v, True, None)

    def cost(self, tq, tk, causal) -> Cost:
        m, d, h = self.num_features, self.head_dim, self.num_heads
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        if self.sparse == "local":
            pairs = min(dense_pairs, tq * (self.local_window if causal else 2 * self.local_window - 1))
        else:  # expected pairs sharing a bucket in one of the rounds (uniform buckets)
            pairs = dense_pairs * (1 - (1 - 1 / self.num_buckets) ** self.num_hashes)
        flops = h * (2.0 * (tq + tk) * d * m + 4.0 * (tq + tk) * m * d  # features, low-rank product
                     + 2.0 * (tq + tk) * d * self.num_buckets * self.num_hashes / 2  # hashing
                     + 4.0 * pairs * (d + m))  # exact scores and the subtracted low-rank on the support
        return Cost(flops=flops, density=flops / dense_flops(h, d, tq, tk, causal),
                    kv_bytes=2.0 * self.num_kv_heads * tk * d * 2)
