"""BigBird: block-sparse attention with window, global and random blocks.

Zaheer et al., "Big Bird: Transformers for Longer Sequences" (NeurIPS 2020), Sec. 2 and
App. D (the blocked "ITC" construction).

The sequence is cut into blocks of ``block_size`` tokens (a last, shorter block when the
length is not a multiple). Query block i attends to key block j when
    window:  |i - j| <= num_window_blocks // 2        (3 blocks: itself and one each side)
    global:  i or j is a global block                 (the first ceil(g/2) and last floor(g/2))
    random:  j is one of the num_random_blocks blocks drawn for (head, i)
The random blocks are drawn per head and query block from a generator seeded by ``seed``
and the block count, excluding blocks already attended: they are the same at training and
at evaluation (Hugging Face's implementation drops them in eval mode; this one does not).
The causal variant keeps only keys at or before the query (random blocks drawn from the
past). With a window covering every block it is exact attention.
"""
from __future__ import annotations

import math

import torch

from methods import masks
from methods.base import Cost, SparseMethod, check_int


class BigBird(SparseMethod):
    name = "bigbird"
    # what the README's method table says (python -m analysis.readme)
    paper = "Zaheer et al. 2020"
    kind = "sparse (blocks)"
    official_test = None
    static_mask = True
    impls = ("reference", "flex", "triton")
    triton_backward = True  # the block-sparse kernel has one

    def __init__(self, block_size: int = 64, num_window_blocks: int = 3, num_global_blocks: int = 2,
                 num_random_blocks: int = 3, seed: int = 0, impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        for name, value, lo in (("block_size", block_size, 1), ("num_window_blocks", num_window_blocks, 1),
                                ("num_global_blocks", num_global_blocks, 0),
                                ("num_random_blocks", num_random_blocks, 0)):
            check_int("BigBird", name, value, lo)
        self.block_size, self.num_window_blocks = block_size, num_window_blocks
        self.num_global_blocks, self.num_random_blocks, self.seed = num_global_blocks, num_random_blocks, seed
        self._layouts: dict = {}

    def layout(self, nq: int, nk: int, causal: bool) -> torch.Tensor:
        """[H, nq, nk] bool: which key blocks each query block attends to (cached per shape)."""
        key = (nq, nk, causal)
        if key in self._layouts:
            return self._layouts[key]
        off = nk - nq  # end-aligned query blocks
        i = torch.arange(nq).view(nq, 1) + off
        j = torch.arange(nk).view(1, nk)
        half = self.num_window_blocks // 2
        base = (i - j).abs() <= half
        g_first, g_last = math.ceil(self.num_global_blocks / 2), self.num_global_blocks // 2
        glob = torch.zeros(nk, dtype=torch.bool)
        glob[:g_first] = True
        if g_last:
            glob[-g_last:] = True
        base = base | glob.view(1, nk) | glob[off:].view(nq, 1)
        if causal:
            base = base & (j <= i)
        lay = base.unsqueeze(0).repeat(self.num_heads, 1, 1)  # [H, nq, nk]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + nk)
        for h in range(self.num_heads):
            for r in range(nq):
                if glob[r + off]:
                    continue  # a global query block already sees everything
                cand = (~lay[h, r]).nonzero().flatten()
                if causal:
                    cand = cand[cand <= r + off]
                if len(cand):
                    pick = cand[torch.randperm(len(cand), generator=g)[: self.num_random_blocks]]
                    lay[h, r, pick] = True
        self._layouts[key] = lay
        return lay

    def mask_mod(self, q, k, causal):
        bs = self.block_size
        nq, nk = math.ceil(q.shape[2] / bs), math.ceil(k.shape[2] / bs)
        lay = self.layout(nq, nk, causal).to(q.device)
        # query rows are end-aligned to the key blocks when Tq < Tk
        qoff = (k.shape[2] - q.shape[2])

        def bigbird_mask(b, h, q_idx, kv_idx):
            qb = (q_idx + qoff) // bs - (nk - nq)
            return lay[h, qb, kv_idx // bs]

        return bigbird_mask

    def flex_layout(self, q, k, causal, block):
        """``layout`` (blocks of ``block_size``) at FlexAttention's blocks (``flex.coarsen``:
        None where block_size does not divide them)."""
        from methods.kernels import flex

        bs, tq, tk = self.block_size, q.shape[2], k.shape[2]
        lay = self.layout(math.ceil(tq / bs), math.ceil(tk / bs), causal).to(q.device).unsqueeze(0)
        return flex.coarsen(lay, bs, bs, block, tq, tk)

    def triton_attend(self, q, k, v, causal, key_padding_mask):
        from methods.kernels import block_sparse as bsk

        bs, T = self.block_size, q.shape[2]
        n = math.ceil(T / bs)
        key = (n, causal, str(q.device))
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans:
            plans.clear()
            plans[key] = bsk.inside_first(*bsk.layout_to_lists(self.layout(n, n, causal).to(q.device).unsqueeze(0)),
                                          block_m=bs, block_n=bs, causal=causal, tq=T, tk=T)
        idx, cnt, nin = plans[key]  # [1, H, nq, m]
        out = bsk.block_sparse_attention(q, k, v, idx, cnt, nin=nin, block_m=bs, block_n=bs, causal=causal,
                                         key_padding_mask=key_padding_mask)
        return out, bsk.tile_work(cnt, bs, bs, q.shape[0], q.shape[1])

    def cost(self, tq, tk, causal) -> Cost:
        bs = self.block_size
        nq, nk = math.ceil(tq / bs), math.ceil(tk / bs)
        m = self.mask_mod(torch.empty(1, 1, tq, 1), torch.empty(1, 1, tk, 1), causal)
        mod = masks.and_masks(m, masks.causal(tk - tq)) if causal else m
        pairs = float(masks.materialize(mod, 1, self.num_heads, tq, tk).sum()) / self.num_heads \
            if tq * tk <= 2**24 else self._block_pairs(nq, nk, causal)
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        return Cost(flops=4.0 * self.num_heads * pairs * self.head_dim, density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)

    def _block_pairs(self, nq, nk, causal) -> float:
        """Pairs counted at block level (long sequences; diagonal blocks half when causal)."""
        lay = self.layout(nq, nk, causal).float()
        n = lay.sum() / self.num_heads * self.block_size ** 2
        if causal:
            n -= nq * self.block_size * (self.block_size - 1) / 2
        return float(n)
