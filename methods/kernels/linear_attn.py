"""Causal linear attention in chunks, in Triton: the Performer's causal path.

Given non-negative features fq, fk [B, H, T, M] and values v [B, H, T, D]:

    num_i = sum_{j <= i} (fq_i . fk_j) v_j        den_i = sum_{j <= i} fq_i . fk_j

One program per (batch x head, block of BV value columns) walks the sequence in chunks of C
tokens, keeping the state S = sum fk_j v_j^T [M, BV] (and z = sum fk_j [M]) on chip: inside
a chunk the masked products (fq fk^T, lower triangle) are exact, across chunks the state
carries the past. Nothing of size T x T or T x M x D is written to memory. The reference is
``methods.performer.Performer._causal_prefix`` (explicit prefix sums); tests compare.
Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import math

import torch

from methods.kernels.block_sparse import triton, usable  # noqa: F401 - usable re-exported

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _causal_linear_fwd(
        FQ, FK, V, NUM, DEN,
        sqb, sqt, skb, skt, svb, svt, snb, snt, sdb,
        T,
        M: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, TILE_M: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        vb = tl.program_id(1)
        offs_c = tl.arange(0, C)
        offs_m = tl.arange(0, TILE_M)
        offs_v = vb * BV + tl.arange(0, BV)
        m_in = offs_m < M
        v_in = offs_v < D
        S = tl.zeros([TILE_M, BV], tl.float32)
        z = tl.zeros([TILE_M], tl.float32)
        lower = offs_c[:, None] >= offs_c[None, :]
        for c0 in range(0, T, C):
            rows = c0 + offs_c
            r_in = rows < T
            fq = tl.load(FQ + bh * sqb + rows[:, None] * sqt + offs_m[None, :],
                         mask=r_in[:, None] & m_in[None, :], other=0.0)  # [C, M]
            fk = tl.load(FK + bh * skb + rows[:, None] * skt + offs_m[None, :],
                         mask=r_in[:, None] & m_in[None, :], other=0.0)  # [C, M]
            v = tl.load(V + bh * svb + rows[:, None] * svt + offs_v[None, :],
                        mask=r_in[:, None] & v_in[None, :], other=0.0)  # [C, BV]
            att = tl.dot(fq, tl.trans(fk))  # [C, C]
            att = tl.where(lower, att, 0.0)
            num = tl.dot(fq, S.to(fq.dtype)) + tl.dot(att.to(v.dtype), v)  # [C, BV]
            tl.store(NUM + bh * snb + rows[:, None] * snt + offs_v[None, :], num,
                     mask=r_in[:, None] & v_in[None, :])
            if vb == 0:  # the normaliser, once per row
                den = tl.sum(fq.to(tl.float32) * z[None, :], 1) + tl.sum(att, 1)
                tl.store(DEN + bh * sdb + rows, den, mask=r_in)
            S += tl.dot(tl.trans(fk), v)  # [M, BV]
            z += tl.sum(fk.to(tl.float32), 0)


def causal_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, chunk: int = 64,
                            block_v: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(num [B, H, T, D], den [B, H, T, 1]) in fp32; fq, fk [B, H, T, M], v [B, H, T, D]."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    B, H, T, M = fq.shape
    D = v.shape[-1]
    if M > 256 or D & (D - 1) or D < 16:
        raise ValueError(f"causal_linear_attention: features M <= 256 and a power-of-two head dim "
                         f">= 16, got M={M}, D={D}")
    fq, fk, v = (x.reshape(B * H, T, x.shape[-1]).contiguous() for x in (fq, fk, v))
    num = torch.empty(B * H, T, D, device=v.device, dtype=torch.float32)
    den = torch.empty(B * H, T, device=v.device, dtype=torch.float32)
    bv = min(block_v, D)
    tile_m = max(16, triton.next_power_of_2(M))
    _causal_linear_fwd[(B * H, math.ceil(D / bv))](
        fq, fk, v, num, den,
        fq.stride(0), fq.stride(1), fk.stride(0), fk.stride(1), v.stride(0), v.stride(1),
        num.stride(0), num.stride(1), den.stride(0),
        T, M=M, D=D, C=chunk, BV=bv, TILE_M=tile_m, num_warps=8 if tile_m * bv >= 128 * 64 else 4,
        num_stages=2,
    )
    return num.view(B, H, T, D), den.view(B, H, T, 1)
