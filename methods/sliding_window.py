"""Sliding-window attention: each query attends to the ``window`` nearest keys.

causal:      keys j with 0 <= i - j < window (the query itself and window - 1 before it)
non-causal:  keys j with |i - j| < window (window - 1 on each side)

The simplest sparse baseline (Longformer's local attention, Mistral's sliding window). With
window >= the sequence length it is exact attention. impl=triton visits only the key tiles
that the window reaches (``methods.kernels.block_sparse``).
"""
from __future__ import annotations

import torch

from methods import masks
from methods.base import Cost, SparseMethod, check_int, dense_flops


class SlidingWindow(SparseMethod):
    name = "sliding_window"
    # what the README's method table says (python -m analysis.readme)
    paper = None
    kind = "sparse"
    official_test = None
    static_mask = True

    impls = ("reference", "flex", "triton")
    triton_backward = True  # the block-sparse kernel has one
    # query x key tile of the Triton path; None: block_sparse.tiles_for (the table that
    # scripts/tune_block_sparse.py --table writes, by head dim, length, dtype, causality, case)
    triton_tiles: tuple[int, int] | None = None
    supports_decode = True  # a decode step sees the last `window` keys, as in the prefill

    def __init__(self, window: int = 512, **structural):
        super().__init__(**structural)
        check_int("SlidingWindow", "window", window)
        self.window = window

    def mask_mod(self, q, k, causal):
        off, w = k.shape[2] - q.shape[2], self.window

        def window_mask(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            return (d < w) & (d > -w)

        return window_mask

    def flex_layout(self, q, k, causal, block):
        """The band |q - k| < window at FlexAttention's blocks (``flex.band``)."""
        from methods.kernels import flex

        return flex.band(q.shape[2], k.shape[2], block, 1 - self.window, self.window - 1, q.device)

    def triton_attend(self, q, k, v, causal, key_padding_mask):
        from methods.kernels import block_sparse as bsk

        T, w = q.shape[2], self.window
        tiles = bsk.tiles_for(q.shape[3], T, q.dtype, causal, window=w, grad=self._wants_grad(q, k, v)) \
            if self.triton_tiles is None else {**bsk.DEFAULT_TILES, "block_m": self.triton_tiles[0],
                                               "block_n": self.triton_tiles[1], "source": "triton_tiles"}
        self.last_kernel_config.update(tiles)
        bm, bn = tiles["block_m"], tiles["block_n"]
        idx, cnt, nin = bsk.window_lists(T, bm, bn, causal, (w,), (w,), (0,), str(q.device))
        out = bsk.block_sparse_attention(q, k, v, idx, cnt, nin=nin, block_m=bm, block_n=bn, causal=causal,
                                         win_l=torch.tensor([w]), win_r=torch.tensor([w]),
                                         key_padding_mask=key_padding_mask, num_warps=tiles["num_warps"],
                                         num_stages=tiles["num_stages"])
        return out, bsk.tile_work(cnt, bm, bn, q.shape[0], q.shape[1])

    def pairs(self, tq: int, tk: int, causal: bool) -> int:
        """Allowed (query, key) pairs, counted in closed form."""
        off, w, n = tk - tq, self.window, 0
        for i in range(tq):  # O(T): cheap next to any attention at that length
            p = i + off
            lo, hi = max(0, p - w + 1), (p if causal else min(tk - 1, p + w - 1))
            n += max(0, min(hi, tk - 1) - lo + 1)
        return n

    def cost(self, tq, tk, causal) -> Cost:
        pairs = self.pairs(tq, tk, causal)
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        return Cost(flops=4.0 * self.num_heads * pairs * self.head_dim,
                    density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * min(tk, self.window) * self.head_dim * 2)


__all__ = ["SlidingWindow", "dense_flops"]
