"""NSA's gated output (Yuan et al. 2025, Eq. 5) in one Triton pass: out = sum_c g_c o_c.

gate_combine(g, o1, o2, o3, dtype): g [..., 3], o_i [..., D] of one shape, fp32 inside, result in
``dtype``. Forward only (no autograd Function: NSA uses it only without gradients).
"""
from __future__ import annotations

import math

import torch

from methods.kernels._common import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gate_combine(G, O1, O2, O3, OUT, N, D: tl.constexpr, BLOCK: tl.constexpr):
        """out = g[:, 0] o1 + g[:, 1] o2 + g[:, 2] o3 over rows of D, in fp32, stored in OUT's dtype."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = rows < N
        offs = rows[:, None] * D + tl.arange(0, D)[None, :]
        g0 = tl.load(G + rows * 3, mask=live, other=0.0).to(tl.float32)
        g1 = tl.load(G + rows * 3 + 1, mask=live, other=0.0).to(tl.float32)
        g2 = tl.load(G + rows * 3 + 2, mask=live, other=0.0).to(tl.float32)
        out = g0[:, None] * tl.load(O1 + offs, mask=live[:, None], other=0.0).to(tl.float32)
        out += g1[:, None] * tl.load(O2 + offs, mask=live[:, None], other=0.0).to(tl.float32)
        out += g2[:, None] * tl.load(O3 + offs, mask=live[:, None], other=0.0).to(tl.float32)
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=live[:, None])


def gate_combine(g: torch.Tensor, o1: torch.Tensor, o2: torch.Tensor, o3: torch.Tensor, dtype) -> torch.Tensor:
    """NSA's gated sum g[..., 0] o1 + g[..., 1] o2 + g[..., 2] o3 in one pass (fp32 inside);
    g [..., 3], o_i [..., D] of one shape; the result in ``dtype``."""
    D = o1.shape[-1]
    if D < 16 or D & (D - 1) or not o1.shape == o2.shape == o3.shape or g.shape != (*o1.shape[:-1], 3):
        raise ValueError(f"gate_combine: gates [..., 3] and three outputs [..., D] (D a power of two) of "
                         f"one shape; got {tuple(g.shape)}, {tuple(o1.shape)}, {tuple(o2.shape)}, {tuple(o3.shape)}")
    g, o1, o2, o3 = (x.contiguous() for x in (g, o1, o2, o3))
    out = torch.empty(o1.shape, device=o1.device, dtype=dtype)
    n, block = o1.numel() // D, 32
    _gate_combine[(math.ceil(n / block),)](g, o1, o2, o3, out, n, D=D, BLOCK=block, num_warps=4)
    return out
