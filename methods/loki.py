"""Loki: approximate scores from low-rank keys (a PCA basis calibrated offline), exact attention
on the top-k keys.

Singhania, Singh, He, Feizi, Bhatele, "Loki: Low-rank Keys for Efficient Sparse Attention"
(NeurIPS 2024, arXiv 2406.02542), Sec. 4 and Alg. 1; official code hpcgroup/loki
(``methods/pca_topk/utils.py``: ``get_pca_components``, ``mask_attn_pca_topk``;
``pca_analysis/pca.py``; ``methods/common/configure_model.py``).

Calibration (offline, ``calibrate(samples)``): per KV head, the principal components of the
calibration keys (sklearn's PCA in the official ``pca.py``: the eigenvectors of the covariance
of the centred keys, by decreasing explained variance), the columns of an orthonormal
P [D, D]. Since P P^T = I, q . k = (q P) . (k P) for every key: the cache stores the keys
rotated, K' = K P (Alg. 1: the KV cache holds the keys in PCA space), and the query is rotated
at each step, q' = q P. A decode step, per query head (grouped heads use their KV head's P):

 1. approximate scores from the first d components only (Alg. 1; the official
    ``mask_attn_pca_topk``, which scales by the full sqrt(D)):
        s^_j = q'[:d] . K'_j[:d] / sqrt(D)
 2. i = the k positions of largest s^; exact attention over them (in the rotated space, equal
    to the original one):
        out = softmax(q' . K'[i]^T / sqrt(D)) V[i]

Defaults as the paper's main setting (d_f = 0.25, k_f = 0.25: d = D/4 components, k = a quarter
of the cache; the official command line takes them as ``--top-r`` and ``--top-k``, with k a
fraction of the current key count, ``int(top_k * S)``, when below 1); ``d`` and ``k`` set
explicitly override the fractions; ``variance`` v in (0, 1) sets d at calibration as the
official ``get_pca_components`` reads a fractional ``top_r``: the largest, over KV heads, count
of components whose cumulative explained variance stays below v. PCA of post-rotary keys (the official default,
``--rotary-type postrotary``): the keys this layer sees are the model's post-rotary keys, so a
pre-rotary basis is not available here. The official projection does not subtract the PCA mean
(the basis comes from centred keys, the keys are projected as they are); so here. The prefill is
dense (the official HF integration also sparsifies prefill rows; Alg. 1 and its kernels are the
decode step). A k of at least the cache reads every key (clamped, ``min(k, S)`` as the official
code; ``last_step["clamped"]``).

The scores are computed in the cache's dtype (fp16 and bf16 as the official code runs the
model), the top k taken in fp32; the exact attention is ``methods.decode.select_then_attend``
(the Triton gather kernel on CUDA).

Bytes per step (``last_step``): the first d components of every rotated key (each KV head's
group reads them once), and the k selected K/V rows. Held: K' and V as dense (the rotation
replaces K; P itself is a per-layer parameter, like the model's weights, not counted).
"""
from __future__ import annotations

import hashlib
import math

import torch

from methods.base import AttentionMethod, Cost, dense_flops
from methods.decode import (
    DecodePath,
    DensePrefill,
    KVCache,
    Selection,
    select_then_attend,
    top_k_selection,
)


class Loki(DensePrefill, DecodePath, AttentionMethod):
    name = "loki"
    # what the README's method table says (python -m analysis.readme)
    paper = "Singhania et al. 2024"
    kind = "sparse decode (low-rank key scores, offline PCA), training-free"
    # the test's reference follows mask_attn_pca_topk: PCA of keys, first-d scores, top-k, exact attention
    official_test = "tests/test_decode_selection.py::test_loki_decode_against_algorithm_1"
    exact = True  # the prefill is dense; the decode selects keys
    impls = ("reference",)
    needs_calibration = True

    def __init__(self, d_f: float = 0.25, k_f: float = 0.25, d: int | None = None, k: int | None = None,
                 variance: float | None = None, impl: str = "reference", **structural):
        super().__init__(impl=impl, **structural)
        if not 0 < d_f <= 1 or not 0 < k_f <= 1:
            raise ValueError(f"Loki: d_f and k_f must be in (0, 1], got {d_f}, {k_f}")
        self.d = max(1, round(d_f * self.head_dim)) if d is None else int(d)
        if not 1 <= self.d <= self.head_dim:
            raise ValueError(f"Loki: d must be in [1, head_dim={self.head_dim}], got {self.d}")
        if k is not None and k < 1:
            raise ValueError(f"Loki: k must be >= 1, got {k}")
        if variance is not None and not 0 < variance < 1:
            raise ValueError(f"Loki: variance must be in (0, 1) or null, got {variance}")
        self.d_f, self.k_f, self.k, self.variance = float(d_f), float(k_f), k, variance
        self.register_buffer("pca", None)  # [Hkv, D, D]: columns the principal components, from calibrate
        self.register_buffer("explained_variance_ratio", None)  # [Hkv, D]
        self._fingerprint = None

    def top_k(self, S: int) -> int:
        """k for a cache holding S keys: the set value, else int(k_f * S) (at least 1)."""
        return int(self.k) if self.k is not None else max(1, int(self.k_f * S))

    def cost(self, tq, tk, causal) -> Cost:
        return Cost(flops=dense_flops(self.num_heads, self.head_dim, tq, tk, causal), density=1.0,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)

    # ---- calibration: the PCA of keys -----------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, samples) -> None:
        """The PCA basis of each KV head from the calibration keys (the k of each (q, k) pair)."""
        pairs = self.calibration_pairs(samples)
        Hkv, D = self.num_kv_heads, self.head_dim
        rows = torch.cat([k.detach().to(torch.float64).cpu().permute(1, 0, 2, 3).reshape(Hkv, -1, D)
                          for _, k in pairs], 1)  # [Hkv, N, D]
        centred = rows - rows.mean(1, keepdim=True)
        var, vecs = torch.linalg.eigh(centred.transpose(1, 2) @ centred)  # the scatter matrix, ascending
        var, vecs = var.flip(-1).clamp_min(0), vecs.flip(-1)  # by decreasing explained variance
        self.explained_variance_ratio = var / var.sum(1, keepdim=True).clamp_min(1e-300)
        self.pca = vecs.contiguous().to(pairs[0][1].device)  # [Hkv, D, D]: columns the components
        if self.variance is not None:  # the official fractional top_r: max over heads (at least 1 here)
            below = (self.explained_variance_ratio.cumsum(-1) < self.variance).sum(-1)
            self.d = max(1, int(below.max()))
        self._fingerprint = hashlib.sha1(self.pca.cpu().numpy().tobytes()).hexdigest()[:12]

    def calibrated(self) -> bool:
        return self.pca is not None

    # ---- decode ---------------------------------------------------------------------------------
    def decode_params(self) -> dict:
        return {"d": self.d, "pca": self._fingerprint}  # k is read per step; the cache holds K P

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Hx, T, D] (Hx = Hkv, or H: grouped heads use their KV head's basis) times P."""
        P = self.pca.to(x.dtype) if x.dtype == torch.float64 else self.pca.to(torch.float32)
        Hx = x.shape[1]
        P = P.repeat_interleave(Hx // P.shape[0], 0).unsqueeze(0)  # [1, Hx, D, D]
        return (x.to(P.dtype) @ P).to(x.dtype)

    def store(self, cache: KVCache, k, v) -> None:
        cache.append(self._rotate(k), v)  # Alg. 1: the cache keeps the keys in PCA space

    def select(self, q_t, cache: KVCache) -> Selection:
        self._check_q(q_t, cache)
        B, H, _, D = q_t.shape
        Hkv, S, d = cache.num_kv_heads, cache.length, self.d
        dt = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        q_rot = self._rotate(q_t)  # [B, H, 1, D]
        kr = cache.keys()[..., :d]  # [B, Hkv, S, d]: the leading components of every key, read in place
        s_hat = (q_rot[..., :d].view(B, Hkv, H // Hkv, d) @ kr.transpose(-1, -2)).view(B, H, S).to(dt) / math.sqrt(D)
        want = self.top_k(S)
        index_bytes = float(B * Hkv * S * d * cache.k.element_size())
        return top_k_selection(s_hat, want, index_bytes=index_bytes, clamped=want > S, extra={"q_rot": q_rot})

    def attend_selected(self, q_t, cache: KVCache, sel: Selection) -> torch.Tensor:
        return select_then_attend(q_t, cache, sel, q=sel.extra["q_rot"])  # (q P) . (k P) = q . k: exact


__all__ = ["Loki"]
