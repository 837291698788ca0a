"""HyperAttention: sortLSH for the large entries plus uniform column sampling; causal by a
recursive split.

Han et al., "HyperAttention: Long-context Attention in Near-Linear Time" (ICLR 2024,
arXiv 2310.05869), Alg. 1-4.

Non-causal (Alg. 2-3). Queries and keys are hashed by an angular LSH with ``lsh_num_projs``
random directions (the sign bits, mapped through the reflected Gray code so that adjacent
buckets differ in one bit: the official ``AngularLSH``), and both are sorted by their hash.
Query and key at sorted ranks r, s are in the same block when r // block_size ==
s // block_size: those pairs (the mask M^H, Alg. 1 "sortLSH") are computed exactly. Then
``sample_size`` key columns are drawn uniformly with replacement; each query also attends to
the sampled keys outside its block, weighted by n_k / sample_size (Alg. 2, the approximate
row sums D~ and the sampled product). Together, with weight w_ij = 1 on its block, w_ij =
(n_k / s) * #draws of j off its block and 0 elsewhere,

    o_i = sum_j w_ij exp(s_ij) v_j / sum_j w_ij exp(s_ij),     s_ij = q_i . k_j / sqrt(D),

which is what the official code computes by merging the two parts' log-sum-exps. Sequences of
at most ``min_seq_len`` queries are computed exactly.
Causal (Alg. 4). The query/key range is split in halves: the two diagonal halves recurse
(causal), the lower-left block (second half of the queries over the first half of the keys)
is the non-causal approximation; the parts merge by their row sums. With Tq < Tk the
queries' view of the first Tk - Tq keys is one non-causal block.

Hardness (the paper's Sec. 1.1 parameters, ``hardness(q, k)``, exact and quadratic: a
diagnostic): alpha = n * max_j ||D^-1 A e_j||^2 (the largest squared column norm of the
softmax matrix, times n) and kappa = the ratio of the largest to the smallest row sum of A
with the sortLSH entries removed (A = exp(QK^T / sqrt(D)), D its row sums); both small make
the approximation provably good. ``report_hardness=True`` computes them on every call into
``last_hardness``.

Defaults follow the official repository (insuhan/hyper-attn): 7 projections, block 256,
256 samples, exact below 4096 queries. Readings of this module: the hash sort is stable
(ties in bucket order by position; the official sort is not stable), the random directions
and samples come from a generator seeded by ``seed`` (and, for the samples, by the block's
offsets), and padded keys are neither computed nor sampled in effect (their weight is 0).
Reference implementation only (it forms the weights w as a dense matrix: true quality, not
true speed); ``computed_keys`` are the pairs with w > 0 (attention recall), ``last_density``
their share. The weights (hashing, sorting, sampling) are the index step, timed into
``last_index_ms`` under ``methods.base.index_timing(True)``.
"""
from __future__ import annotations

import math

import torch

from methods import masks
from methods.base import AttentionMethod, Cost, repeat_kv, timed_index


class HyperAttention(AttentionMethod):
    name = "hyper_attention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Han et al. 2024"
    kind = "sparse (LSH blocks + sampled columns)"
    official_test = None
    has_index = True  # sortLSH and sampling (the weights w), under index_timing
    impls = ("reference",)
    last_path: str | None = None  # as the sparse methods': the path the last call took

    def __init__(self, lsh_num_projs: int = 7, block_size: int = 256, sample_size: int = 256,
                 min_seq_len: int = 4096, seed: int = 0, report_hardness: bool = False, impl: str = "reference",
                 **structural):
        super().__init__(impl=impl, **structural)
        for n, val, low in (("lsh_num_projs", lsh_num_projs, 1), ("block_size", block_size, 1),
                            ("sample_size", sample_size, 0), ("min_seq_len", min_seq_len, 1)):
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise ValueError(f"HyperAttention: {n} must be an integer >= {low}, got {val!r}")
        if lsh_num_projs > 30:
            raise ValueError(f"HyperAttention: lsh_num_projs={lsh_num_projs} gives 2^{lsh_num_projs} buckets; "
                             f"use at most 30")
        self.lsh_num_projs, self.block_size, self.sample_size = lsh_num_projs, block_size, sample_size
        self.min_seq_len, self.seed, self.report_hardness = min_seq_len, seed, bool(report_hardness)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj_dir", torch.randn(self.head_dim, lsh_num_projs, generator=g), persistent=False)
        self.last_hardness: dict | None = None

    # ---- the plan: the weights w ------------------------------------------------------------
    def lsh_hash(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n, D] -> [..., n] bucket ids: the sign bits of the projections, Gray-coded."""
        bits = (x.to(self.proj_dir.dtype) @ self.proj_dir.to(x.device)) > 0
        code = (bits.long() * (2 ** torch.arange(self.lsh_num_projs, device=x.device))).sum(-1)
        return code ^ (code >> 1)

    def draw_samples(self, B: int, H: int, nk: int, qo: int, ko: int, device=None) -> torch.Tensor:
        """[B, H, sample_size] sampled sorted-key ranks (with replacement) of the block at
        query offset qo and key offset ko (seeded: the same on every call)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + qo * 7919 + ko)
        return torch.randint(nk, (B, H, self.sample_size), generator=g).to(device)

    def _noncausal_weights(self, q, k, qo, ko):
        """[B, H, nq, nk] weights w of one non-causal block (see the module docstring)."""
        B, H, nq, _ = q.shape
        nk = k.shape[2]
        dt = torch.float64
        if nq <= self.min_seq_len:
            return torch.ones(B, H, nq, nk, dtype=dt, device=q.device)
        rank_q = self.lsh_hash(q).argsort(dim=-1, stable=True).argsort(-1)  # sorted rank of each query
        k_order = self.lsh_hash(k).argsort(dim=-1, stable=True)
        rank_k = k_order.argsort(-1)
        same = (rank_q // self.block_size).unsqueeze(-1) == (rank_k // self.block_size).unsqueeze(-2)
        w = same.to(dt)
        if self.sample_size and nk > self.sample_size:
            picks = k_order.gather(-1, self.draw_samples(B, H, nk, qo, ko, q.device))  # key ids
            count = torch.zeros(B, H, nk, dtype=dt, device=q.device).scatter_add_(
                -1, picks, torch.ones_like(picks, dtype=dt))
            w = w + (~same).to(dt) * (nk / self.sample_size) * count.unsqueeze(-2)
        return w

    def _causal_weights(self, q, k, qo, ko):
        """[B, H, n, n] weights of a causal square block (the recursive split of Alg. 4)."""
        n = q.shape[2]
        B, H = q.shape[:2]
        if n <= self.min_seq_len:
            return torch.ones(n, n, dtype=torch.float64, device=q.device).tril().expand(B, H, n, n)
        h = n // 2
        w = torch.zeros(B, H, n, n, dtype=torch.float64, device=q.device)
        w[..., :h, :h] = self._causal_weights(q[:, :, :h], k[:, :, :h], qo, ko)
        w[..., h:, h:] = self._causal_weights(q[:, :, h:], k[:, :, h:], qo + h, ko + h)
        w[..., h:, :h] = self._noncausal_weights(q[:, :, h:], k[:, :, :h], qo + h, ko)
        return w

    def weights(self, q, k, causal) -> torch.Tensor:
        """[B, H, Tq, Tk] float64 weights w (0: the pair is not computed)."""
        with torch.no_grad():
            H = q.shape[1]
            k = repeat_kv(k, H // k.shape[1])
            tq, tk = q.shape[2], k.shape[2]
            if not causal:
                return self._noncausal_weights(q, k, 0, 0)
            off = tk - tq
            if off <= 0:  # queries before the first key see nothing
                w = torch.zeros(q.shape[0], H, tq, tk, dtype=torch.float64, device=q.device)
                w[..., -off:, :] = self._causal_weights(q[:, :, -off:], k, -off, 0)
                return w
            return torch.cat([self._noncausal_weights(q, k[:, :, :off], 0, 0),
                              self._causal_weights(q, k[:, :, off:], 0, off)], -1)

    def computed_keys(self, q, k, causal: bool) -> torch.Tensor:
        return self.weights(q, k, causal) > 0

    # ---- the contract --------------------------------------------------------------------------
    def attend(self, q, k, v, causal, key_padding_mask):
        B, H, tq, D = q.shape
        tk = k.shape[2]
        self.last_path = "reference"
        with timed_index(self, q):  # sortLSH and the sampled columns
            w = self.weights(q, k, causal)
        if key_padding_mask is not None:
            w = w * key_padding_mask.view(B, 1, 1, tk)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = (q.to(dt) @ repeat_kv(k, H // k.shape[1]).to(dt).transpose(-1, -2)) / math.sqrt(D)
        s = s + torch.log(w.to(dt))  # log 0 = -inf: pairs not computed
        p = torch.softmax(s, -1).nan_to_num(0.0)  # rows with nothing: zeros
        pairs = float(B * H * (masks.causal_pairs(tq, tk) if causal else tq * tk))
        self.last_density = float((w > 0).sum()) / pairs
        if self.report_hardness:
            self.last_hardness = self.hardness(q, k)
        return (p @ repeat_kv(v, H // v.shape[1]).to(dt)).to(q.dtype)

    @torch.no_grad()
    def hardness(self, q, k) -> dict:
        """The paper's fine-grained parameters of (non-causal) attention on q, k: alpha and kappa
        (the largest over batch elements and heads; see the module docstring)."""
        H, D = q.shape[1], q.shape[-1]
        kk = repeat_kv(k, H // k.shape[1]).double()
        s = q.double() @ kk.transpose(-1, -2) / math.sqrt(D)
        s = s - s.amax((-1, -2), keepdim=True)  # one shift per head: ratios unchanged
        a = torch.exp(s)
        n = a.shape[-1]
        alpha = float((n * (a / a.sum(-1, keepdim=True)).pow(2).sum(-2).amax(-1)).max())
        if q.shape[2] > self.min_seq_len:  # the sortLSH blocks' entries are removed
            rank_q = self.lsh_hash(q).argsort(dim=-1, stable=True).argsort(-1)
            rank_k = self.lsh_hash(kk).argsort(dim=-1, stable=True).argsort(-1)
            big = (rank_q // self.block_size).unsqueeze(-1) == (rank_k // self.block_size).unsqueeze(-2)
        else:  # exact: nothing is removed
            big = torch.zeros(a.shape, dtype=torch.bool, device=a.device)
        rest = (a * ~big).sum(-1)
        kappa = float((rest.amax(-1) / rest.amin(-1).clamp_min(torch.finfo(torch.float64).tiny)).max())
        return {"alpha": alpha, "kappa": kappa}

    def cost(self, tq, tk, causal) -> Cost:
        """Per level of the split: the blocks of the sortLSH diagonal and the sampled columns of
        each query; exact below min_seq_len."""
        pairs = self._pairs(tq, tk, causal)
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        index = 2.0 * (tq + tk) * self.lsh_num_projs * self.head_dim
        return Cost(flops=self.num_heads * (4.0 * pairs * self.head_dim + index), density=min(1.0, pairs / dense_pairs),
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)

    def _pairs(self, tq, tk, causal) -> float:
        def nc(nq, nk):
            if nq <= self.min_seq_len:
                return float(nq * nk)
            return float(nq) * (min(self.block_size, nk) + (self.sample_size if nk > self.sample_size else 0))

        def c(n):
            if n <= self.min_seq_len:
                return n * (n + 1) / 2.0
            h = n // 2
            return c(h) + c(n - h) + nc(n - h, h)

        if not causal:
            return nc(tq, tk)
        off = tk - tq
        return (nc(tq, off) if off > 0 else 0.0) + c(min(tq, tk))
