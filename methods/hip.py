"""HiP: hierarchical top-k pruning of key blocks by a tree search on representative tokens.

Lee et al., "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention
Pruning" (ICLR 2025, arXiv 2406.09827), Sec. 3.1 and Alg. 1 (the mask estimation).

Queries are grouped in blocks of ``block_q``, keys in blocks of ``block_k``; each query block
keeps K = top_k // block_k key blocks, chosen among the N key blocks of its range (the blocks
up to its last query when causal, all otherwise) by a search that halves branches:

    init:     the N blocks are split into K contiguous branches (boundaries floor(i N / K))
    repeat:   each branch [s, t) with t - s > 1 is split into [s, m) and [m, t),
              m = s + ceil((t - s) / 2) (a branch of one block stays as it is);
              each child is scored by its representative key block (its first block):
                  score = max over the block's queries i and the block's keys j of q_i . k_j
              and the K best children among the 2K are kept
    until:    every branch is one key block: those K blocks are the mask

so the search costs O(T log T) dot products instead of T^2 (the paper's Eq. 2-4 and Fig. 2).
With N <= K every block is kept. The attention then keeps, for a query at position p, the
keys of its block's K selected blocks plus the local window (p - j < window, and j <= p when
causal; |p - j| < window otherwise), exactly.

Defaults follow the official repository's first ``hip_attention``: mask_k 512 (top_k),
block_size_q 32, block_size_k 2, sliding window 128; the first token of a branch as its
representative is its later default ``sample_method='first'``. Readings of this module: the
window is added on top of the top-k (the official kernel adds its window likewise), the score
ignores the causal order inside the query block (the block's last query sees every key of the
range), and padded keys are never representatives. The non-causal form (all keys in range)
is this module's extension: the paper's kernels are causal.
``block_layout(q, k, causal)`` is the index-building step on its own, timed into ``last_index_ms`` under ``index_timing(True)``; each call
sets ``last_density``.
"""
from __future__ import annotations

import math

import torch

from methods import masks
from methods.base import Cost, SparseMethod, repeat_kv, timed_index


class HiP(SparseMethod):
    name = "hip"
    # what the README's method table says (python -m analysis.readme)
    paper = "Lee et al. 2024"
    kind = "sparse (hierarchical top-k blocks)"
    official_test = None
    has_index = True  # the index step is timed apart under index_timing
    impls = ("reference", "flex")

    def __init__(self, top_k: int = 512, block_q: int = 32, block_k: int = 2, window: int = 128,
                 impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        for n, val, low in (("top_k", top_k, 1), ("block_q", block_q, 1), ("block_k", block_k, 1),
                            ("window", window, 0)):
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise ValueError(f"HiP: {n} must be an integer >= {low}, got {val!r}")
        if top_k < block_k:
            raise ValueError(f"HiP: top_k={top_k} must be at least one key block (block_k={block_k})")
        self.top_k, self.block_q, self.block_k, self.window = top_k, block_q, block_k, window
        self._kpm = None
        self._lay = None

    def ranges(self, tq, tk, causal, device=None) -> torch.Tensor:
        """[nq] number of key blocks in each query block's range."""
        nq = math.ceil(tq / self.block_q)
        if not causal:
            return torch.full((nq,), math.ceil(tk / self.block_k), device=device)
        last = torch.clamp((torch.arange(nq, device=device) + 1) * self.block_q, max=tq) - 1 + (tk - tq)
        return torch.div(last, self.block_k, rounding_mode="floor") + 1

    def block_layout(self, q, k, causal, key_padding_mask=None):
        """The block layout (below): the index-building step, timed into ``last_index_ms`` under
        ``methods.base.index_timing(True)`` (no sync otherwise)."""
        with timed_index(self, q):
            return self._block_layout(q, k, causal, key_padding_mask)

    score_bytes = 1 << 30  # representative scores held at once (query blocks chunked to fit)

    @torch.no_grad()
    def _block_layout(self, q, k, causal, key_padding_mask=None) -> torch.Tensor:
        """[B, H, nq, nk] bool: the K key blocks the tree search keeps for each query block."""
        B, H, tq, D = q.shape
        tk, bq, bk = k.shape[2], self.block_q, self.block_k
        nq, nk = math.ceil(tq / bq), math.ceil(tk / bk)
        K = self.top_k // bk
        dev = q.device
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qb = torch.nn.functional.pad(q.to(dt), (0, 0, 0, nq * bq - tq)).view(B, H, nq, bq, D)
        qok = (torch.arange(nq * bq, device=dev) < tq).view(1, 1, nq, bq, 1, 1)
        kk = torch.nn.functional.pad(repeat_kv(k, H // k.shape[1]).to(dt), (0, 0, 0, nk * bk - tk))
        kok = torch.zeros(B, nk * bk, dtype=torch.bool, device=dev)  # keys that may represent a branch
        kok[:, :tk] = True if key_padding_mask is None else key_padding_mask
        n = self.ranges(tq, tk, causal, dev).view(1, 1, nq, 1)
        i = torch.arange(K + 1, device=dev).view(1, 1, 1, K + 1)
        bounds = (i * n) // K  # [1, 1, nq, K + 1]
        starts = bounds[..., :-1].expand(B, H, nq, K)
        ends = bounds[..., 1:].expand(B, H, nq, K)
        off = torch.arange(bk, device=dev)
        chunk = max(1, self.score_bytes // (4 * B * H * bq * 2 * K * bk))
        while bool((ends - starts > 1).any()):
            size = ends - starts
            mid = starts + (size + 1) // 2
            cs, ce = torch.cat([starts, mid], -1), torch.cat([mid, ends], -1)  # [B, H, nq, 2K]
            keys = (cs.clamp(max=nk - 1) * bk).unsqueeze(-1) + off  # representative block's keys
            score = torch.empty(B, H, nq, 2 * K, dtype=dt, device=dev)
            for a in range(0, nq, chunk):  # query blocks in chunks: the scores fit score_bytes
                c = min(chunk, nq - a)
                kc = keys[:, :, a:a + c]
                kr = kk.gather(2, kc.reshape(B, H, -1, 1).expand(-1, -1, -1, D)).view(B, H, c, 2 * K, bk, D)
                s = torch.einsum("bhnqd,bhnckd->bhnqck", qb[:, :, a:a + c], kr)  # [B, H, c, bq, 2K, bk]
                valid = kok.gather(1, kc.reshape(B, -1)).view(B, H, c, 1, 2 * K, bk)
                s = s.masked_fill(~qok[:, :, a:a + c], float("-inf")).masked_fill(~valid, float("-inf"))
                score[:, :, a:a + c] = s.amax(dim=(3, 5))
            score = score.masked_fill(ce <= cs, float("-inf"))  # empty children last
            top = score.topk(K, dim=-1).indices
            starts, ends = cs.gather(-1, top), ce.gather(-1, top)
        lay = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=dev)
        lay.scatter_(-1, torch.where(ends - starts == 1, starts, nk), True)
        return lay[..., :nk]

    def mask_mod(self, q, k, causal):
        lay = self.block_layout(q, k, causal, self._kpm)
        self._lay = lay  # reused by flex_layout (called after mask_mod for the same inputs)
        # 8 key blocks a byte: at 128k the bool layout passes 2^31 elements; bytes, not int64 words,
        # because the compiled kernel stages this per-element gather in shared memory (int64 words
        # asked an H200 for 368 KiB: "No valid triton configs", session 13)
        words = masks.pack_bits(lay, word_bits=8)
        off, bq, bk, w = k.shape[2] - q.shape[2], self.block_q, self.block_k, self.window

        def hip_mask(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            near = (d < w) if causal else (d.abs() < w)
            j = kv_idx // bk
            return (((words[b, h, q_idx // bq, j // 8].to(torch.int32) >> (j % 8)) & 1) != 0) | near

        return hip_mask

    def flex_layout(self, q, k, causal, block):
        """The blocks of ``mask_mod`` at FlexAttention's ``block``: the tree search's layout
        (built by ``mask_mod``) coarsened (``flex.coarsen``), with the local window's band
        (``flex.band``). Full blocks are those wholly inside one of the two (a block covered
        only by their union stays partial: correct, the mask function runs there). None where
        block_q or block_k does not divide ``block``."""
        from methods.kernels import flex

        tq, tk = q.shape[2], k.shape[2]
        lay = flex.coarsen(self._lay, self.block_q, self.block_k, block, tq, tk)
        if lay is None:
            return None
        w = self.window
        if w == 0:  # no window (band's lo > hi would still touch blocks crossing the diagonal)
            return lay
        b_any, b_full = flex.band(tq, tk, block, 0 if causal else 1 - w, w - 1, q.device)
        return lay[0] | b_any, lay[1] | b_full

    def attend(self, q, k, v, causal, key_padding_mask):
        self._kpm = key_padding_mask  # padded keys are never representatives
        try:
            return super().attend(q, k, v, causal, key_padding_mask)
        finally:
            self._kpm = self._lay = None

    def cost(self, tq, tk, causal) -> Cost:
        """The budget: each query keeps at most top_k + window keys (of those it may see); and
        the search's dot products (2K representative blocks per level, log2(N / K) levels)."""
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        p = torch.arange(tk - tq, tk, dtype=torch.float64)
        seen = p + 1 if causal else torch.full_like(p, float(tk))
        per_window = self.window if causal else 2 * self.window - 1
        pairs = float(torch.clamp(seen, max=self.top_k + max(per_window, 0)).sum())
        K = max(1, self.top_k // self.block_k)
        levels = max(0, math.ceil(math.log2(max(1.0, tk / self.block_k / K))))
        index = 2.0 * tq * 2 * K * self.block_k * levels * self.head_dim
        return Cost(flops=self.num_heads * (4.0 * pairs * self.head_dim + index), density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)

