"""Routing Transformer: content-based sparse attention by online k-means routing.

Roy, Saffar, Vaswani and Grangier, "Efficient Content-Based Sparse Attention with Routing
Transformers" (TACL 2021, arXiv 2003.05997), Sec. 4.1-4.2.

Per head, C centroids mu_1 .. mu_C (unit vectors, [H, C, d]). Queries and keys are
layer-normalised without scale or bias (the paper's LN before routing, "so that they lie on
the unit ball" up to the factor sqrt(d)) and assigned to their nearest centroid by cosine:

    c(x) = argmax_c  mu_c . LN(x)                                   (Eq. 8's routing)
    X_i  = {j : c(K_j) = c(Q_i)}                                    query i attends X_i only
    o_i  = sum_{j in X_i} softmax_j(q_i . k_j / sqrt(d)) v_j        (exact inside the cluster)

Online k-means (Sec. 4.2): in training, after each forward, every centroid moves to the
exponential moving average of the queries and keys assigned to it,

    mu_c <- lambda mu_c + (1 - lambda) / 2 * (mean_{i: c(Q_i)=c} LN(Q_i) + mean_{j: c(K_j)=c} LN(K_j))

then it is renormalised to unit length (the official code, google-research/
google-research/routing_transformer, also averages rather than sums; lambda = 0.999 there).
Centroids with no member keep their value. The centroids are a buffer, drawn from
``centroid_seed`` (fixed at evaluation); they are no gradient-trained parameters.

Readings chosen: the official code balances clusters by letting each centroid take its top
T/C queries and keys (``balanced=true`` here: a query attends to the keys in the clusters
that chose it, i.e. pair (i, j) is kept when some centroid picked both); ``balanced=false``
is the paper's equation (nearest centroid). Balanced membership is ranked over the whole
sequence, so with ``causal=True`` which past keys a query sees can depend on later tokens (as
in the official code), and a decode step (one query) is not the prefill's row; the nearest-
centroid routing has neither issue. Causal masking is applied on top; a query with
no key in its cluster before it gets zeros (the masked-attention convention). The paper
mixes routing heads with local-attention heads in a model; this method is the routing
attention alone (``local_window`` > 0 adds the local window of that many keys to every head).
Keys of grouped KV heads are routed with each query head's centroids. Decoding keeps the
routing (the cluster of each cached key).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods import masks
from methods.base import Cost, SparseMethod, repeat_kv


class RoutingTransformer(SparseMethod):
    name = "routing_transformer"
    # what the README's method table says (python -m analysis.readme)
    paper = "Roy et al. 2021"
    kind = "sparse (k-means routing)"
    official_test = None
    trainable = True  # the centroids follow the trained queries and keys (online k-means)
    training_free = False
    supports_decode = True

    def __init__(self, num_clusters: int = 16, decay: float = 0.999, balanced: bool = True,
                 local_window: int = 0, centroid_seed: int = 0, impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        if num_clusters < 1:
            raise ValueError(f"RoutingTransformer: num_clusters must be >= 1, got {num_clusters}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"RoutingTransformer: decay must be in [0, 1), got {decay}")
        if local_window < 0:
            raise ValueError(f"RoutingTransformer: local_window must be >= 0, got {local_window}")
        self.num_clusters, self.decay, self.balanced = num_clusters, decay, balanced
        self.local_window = local_window
        g = torch.Generator().manual_seed(centroid_seed)
        mu = torch.randn(self.num_heads, num_clusters, self.head_dim, generator=g)
        self.register_buffer("centroids", F.normalize(mu, dim=-1), persistent=True)

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """LN without scale or bias over the head dimension, fp32 (fp64 for fp64)."""
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return F.layer_norm(x.to(dt), x.shape[-1:])

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, d] -> [B, H, T, C]: each token's cosine-like affinity to every centroid."""
        return torch.einsum("bhtd,hcd->bhtc", self.normalise(x), self.centroids.to(torch.float64 if x.dtype ==
                                                                               torch.float64 else torch.float32))

    def members(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, C] bool: which clusters each token belongs to (nearest centroid, or the
        balanced top-k: each centroid takes its ceil(T / C) closest tokens)."""
        s = self.scores(x)
        if not self.balanced:
            return F.one_hot(s.argmax(-1), self.num_clusters).bool()
        w = min(x.shape[2], math.ceil(x.shape[2] / self.num_clusters))
        top = s.topk(w, dim=2).indices  # [B, H, w, C] the tokens each centroid takes
        return torch.zeros_like(s, dtype=torch.bool).scatter_(2, top, True)

    def mask_mod(self, q, k, causal):
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        mq, mk = self.members(q), self.members(k)
        self._members = (mq, mk)  # reused by flex_layout (called after mask_mod for the same inputs)
        if self.training and torch.is_grad_enabled():
            self._update(q, k, mq.float(), mk.float())
        bq, bk = masks.pack_bits(mq), masks.pack_bits(mk)  # [B, H, T, W] int64: O(T) memory, not T x T
        win, off, words = self.local_window, k.shape[2] - q.shape[2], bq.shape[-1]

        def routing_mask(b, h, q_idx, kv_idx):
            keep = (bq[b, h, q_idx, 0] & bk[b, h, kv_idx, 0]) != 0  # some cluster holds both
            for w in range(1, words):
                keep = keep | ((bq[b, h, q_idx, w] & bk[b, h, kv_idx, w]) != 0)
            if win:
                keep = keep | ((q_idx + off - kv_idx).abs() < win)
            return keep

        return routing_mask

    def flex_layout(self, q, k, causal, block):
        """The blocks some query and some key of which share a cluster (each block's cluster
        sets, OR-ed over its tokens, meet), with the local window's band (``flex.band``).
        Cluster pairs are not blockwise: only the window's blocks are marked full."""
        from methods.kernels import flex

        (mq, mk), self._members = self._members, None  # not held between calls
        tq, tk = q.shape[2], k.shape[2]

        def per_block(m, t):  # [B, H, t, C] -> [B, H, ceil(t / block), C]: any token of the block
            n = -(-t // block)
            m = F.pad(m, (0, 0, 0, n * block - t))
            return m.view(*m.shape[:2], n, block, m.shape[-1]).any(3).to(torch.float32)

        any_ = (per_block(mq, tq) @ per_block(mk, tk).transpose(-1, -2)) > 0
        full = torch.zeros_like(any_)
        if self.local_window:
            w = self.local_window
            b_any, b_full = flex.band(tq, tk, block, 1 - w, w - 1, q.device)
            any_, full = any_ | b_any, full | b_full
        return any_, full

    @torch.no_grad()
    def _update(self, q, k, mq, mk) -> None:
        """One online k-means step (the EMA of Sec. 4.2) from this batch's queries and keys."""
        def means(x, m):  # [B, H, T, d], [B, H, T, C] -> [H, C, d] mean of members, [H, C] counts
            tot = torch.einsum("bhtc,bhtd->hcd", m, self.normalise(x).to(m.dtype))
            n = m.sum((0, 2))
            return tot / n.clamp_min(1)[..., None], n

        sq, nq = means(q, mq)
        sk, nk = means(k, mk)
        mu = self.centroids.to(sq.dtype)
        new = self.decay * mu + (1 - self.decay) / 2 * (sq + sk)
        new = torch.where(((nq > 0) & (nk > 0))[..., None], F.normalize(new, dim=-1), mu)
        self.centroids.copy_(new.to(self.centroids.dtype))

    def cost(self, tq, tk, causal) -> Cost:
        c = self.num_clusters
        pairs = tq * min(tk, math.ceil(tk / c)) + (tq * min(tk, 2 * self.local_window - 1) if self.local_window else 0)
        if causal:
            pairs = pairs / 2
        pairs = min(pairs, masks.causal_pairs(tq, tk) if causal else tq * tk)
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        h, d = self.num_heads, self.head_dim
        flops = 4.0 * h * pairs * d + 2.0 * h * (tq + tk) * c * d  # attention + routing
        return Cost(flops=flops, density=pairs / dense_pairs, kv_bytes=2.0 * self.num_kv_heads * tk * d * 2)
