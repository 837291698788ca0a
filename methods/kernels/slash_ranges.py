"""MInference's ``convert_vertical_slash_indexes`` slash scan as one Triton kernel.

The official CUDA kernel (microsoft/MInference, csrc) walks each block row's slashes in
decreasing offset order and merges their 64-wide ranges; a PyTorch version of that walk
(``methods.minference.slash_ranges``) issues about ten small operations per slash, a thousand
launches per call at the default 128 slashes, and on a GPU its time is launch time (27 ms of a
4k prefill at 32 heads). Here one program walks the slashes of one head for a tile of block
rows at once, keeping the walk's state (started, end) in registers.

    slash_range_starts(offs, R, block) -> starts [B, H, R, n] (unsorted, NONE where unused), end [B, H, R]

``offs`` [B, H, n]: each head's slash offsets o = i - j in decreasing order, -1 for none.
"""
from __future__ import annotations

import torch

from ._common import triton, usable  # noqa: F401  (usable: for the caller)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _slash_scan(offs_ptr, starts_ptr, end_ptr, n, R, none,
                    BLOCK: tl.constexpr, ROWS: tl.constexpr):
        bh = tl.program_id(0)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        live = rows < R
        m1 = (rows + 1) * BLOCK
        started = tl.zeros([ROWS], dtype=tl.int1)
        end = tl.zeros([ROWS], dtype=tl.int64)
        for t in range(n):
            o = tl.load(offs_ptr + bh * n + t).to(tl.int64)
            s = tl.maximum(m1 - o, BLOCK)
            ok = (o >= 0) & (o < m1)
            new = ok & ((started == 0) | (s > end + BLOCK))
            grow = ok & (new == 0) & (s > end)
            start = tl.where(new, s - BLOCK, tl.where(grow, end, none))
            tl.store(starts_ptr + (bh * R + rows) * n + t, start, mask=live)
            end = tl.where(new, s, tl.where(grow, end + BLOCK, end))
            started = started | ok
        tl.store(end_ptr + bh * R + rows, end, mask=live)


def slash_range_starts(offs: torch.Tensor, R: int, block: int, none: int, rows: int = 64):
    """The slash walk of ``methods.minference.slash_ranges`` for every head and block row:
    (starts [B, H, R, n] int64 in walk order, ``none`` where a slash opens or extends nothing;
    end [B, H, R] int64)."""
    B, H, n = offs.shape
    offs = offs.contiguous()
    starts = torch.empty(B, H, R, n, dtype=torch.long, device=offs.device)
    end = torch.empty(B, H, R, dtype=torch.long, device=offs.device)
    grid = (B * H, triton.cdiv(R, rows))
    _slash_scan[grid](offs, starts, end, n, R, none, BLOCK=block, ROWS=rows)
    return starts, end
