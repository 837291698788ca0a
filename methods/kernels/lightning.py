"""Lightning Attention's causal tiled product in Triton (Lightning Attention-2, Qin et al.,
arXiv 2401.04658, Alg. 1; the decay of TransNormerLLM, arXiv 2307.14995, Sec. 3.1):

    o_i = sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j           (lambda = exp(log_decay_h) <= 1)

one program per (batch x head, block of BV value columns) walks the chunks of C tokens in order,
as the official kernel does: inside a chunk the masked, decayed product
[(Q_c K_c^T) (.) M] V_c with M_ij = lambda^(i-j) (i >= j); across chunks the state
S [d, BV] (fp32, on chip) read as lambda^(i+1) Q_c S and updated as
S = lambda^C S + (lambda^(C-1-j) K_c)^T V_c. O(T) memory, nothing of size T x T.
The reference is ``methods.lightning.tiled_causal`` (the same tiling in PyTorch); the tests
compare against the explicit matrix. Not yet a path of ``methods.lightning.Lightning``
(scripts/lightning_fla_bench.py times it against fla). Runs on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1``. Parallelism is B * H * d_v / BV programs: at B = 1 that is few programs
for a GPU (the limit of this one-pass design; fla splits the chunks over programs in two passes).
"""
from __future__ import annotations

import math

import torch

from methods.kernels._common import triton, usable  # noqa: F401 - usable re-exported

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _lightning_fwd(Q, K, V, O, LD, T, H, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                       BV: tl.constexpr):
        bh = tl.program_id(0)
        vb = tl.program_id(1)
        ld = tl.load(LD + bh % H)  # log lambda (fp32, <= 0)
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D)
        offs_v = vb * BV + tl.arange(0, BV)
        pos = offs_c.to(tl.float32)
        diff = pos[:, None] - pos[None, :]
        intra = tl.where(diff >= 0, tl.exp(ld * tl.maximum(diff, 0.0)), 0.0)  # [C, C]
        q_in = tl.exp(ld * (pos + 1.0))  # lambda^(i+1)
        k_out = tl.exp(ld * (C - 1.0 - pos))  # lambda^(C-1-j)
        block_decay = tl.exp(ld * C)
        state = tl.zeros([D, BV], dtype=tl.float32)
        q_base, v_base = Q + bh * T * D, V + bh * T * E
        k_base, o_base = K + bh * T * D, O + bh * T * E
        for c0 in range(0, T, C):
            rows = c0 + offs_c
            rm = rows < T
            q = tl.load(q_base + rows[:, None] * D + offs_d[None, :], mask=rm[:, None], other=0.0)
            k = tl.load(k_base + rows[:, None] * D + offs_d[None, :], mask=rm[:, None], other=0.0)
            vm = rm[:, None] & (offs_v < E)[None, :]
            v = tl.load(v_base + rows[:, None] * E + offs_v[None, :], mask=vm, other=0.0)
            s = tl.dot(q, tl.trans(k)) * intra
            o = tl.dot(s.to(v.dtype), v)
            o += tl.dot((q * q_in[:, None]).to(q.dtype), state.to(q.dtype))
            tl.store(o_base + rows[:, None] * E + offs_v[None, :], o.to(O.dtype.element_ty), mask=vm)
            state = state * block_decay + tl.dot(tl.trans((k * k_out[:, None]).to(k.dtype)), v)


def lightning_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                     chunk: int = 64, block_v: int = 64) -> torch.Tensor:
    """sum_{j <= i} lambda_h^(i-j) (q_i . k_j) v_j: q, k [B, H, T, d], v [B, H, T, e] (one head
    of keys per query head), log_decay [H] (log lambda <= 0; None: lambda = 1); out in v's dtype."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning kernel: q, k [B, H, T, d] of one shape and v [B, H, T, e]; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, D = q.shape
    E = v.shape[-1]
    if D & (D - 1) or D < 16 or E & (E - 1) or E < 16 or chunk not in (16, 32, 64, 128):
        raise ValueError(f"lightning kernel: power-of-two head dims >= 16 and a chunk of 16-128 tokens; "
                         f"got d={D}, e={E}, chunk={chunk}")
    if log_decay is not None and (log_decay.shape != (H,) or bool((log_decay > 0).any())):
        raise ValueError(f"lightning kernel: log_decay must be [H={H}] and <= 0, got {tuple(log_decay.shape)}")
    ld = torch.zeros(H, device=q.device, dtype=torch.float32) if log_decay is None else \
        log_decay.to(device=q.device, dtype=torch.float32).contiguous()
    dt = v.dtype
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    bv = min(block_v, E)
    out = torch.empty(B, H, T, E, device=v.device, dtype=dt)
    if T:
        _lightning_fwd[(B * H, math.ceil(E / bv))](q, k, v, out, ld, T, H, D=D, E=E, C=chunk, BV=bv,
                                                   num_warps=4 if D * bv <= 64 * 64 else 8)
    return out
