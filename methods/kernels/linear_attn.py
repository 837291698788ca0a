"""Causal linear attention in chunks, in Triton: the Performer's causal path.

Given non-negative features fq, fk [B, H, T, M] and values v [B, H, T, D]:

    num_i = sum_{j <= i} (fq_i . fk_j) v_j        den_i = sum_{j <= i} fq_i . fk_j

Two passes over chunks of C tokens (the default, as flash-linear-attention's chunked form):
(1) one program per (batch x head, block of feature rows, block of value columns) walks the
chunks and stores the state before each one, S_c = sum_{j < c0} fk_j v_j^T [M, D] (and
z_c = sum fk_j); (2) one program per (batch x head, chunk, block of value columns) computes
its outputs from S_c plus the chunk's own lower triangle (fq fk^T, masked), all chunks in
parallel. The states take T / C x M x D floats per head: linear in T.
``two_pass=False`` runs the first design instead: one program per (batch x head, value
block) walking the chunks with the state on chip (little parallelism at B=1: kept to compare).
Nothing of size T x T is written. The reference is ``methods.performer.Performer._causal_prefix``
(explicit prefix sums); tests compare. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import math

import torch

from methods.kernels.block_sparse import triton, usable  # noqa: F401 - usable re-exported

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _chunk_out(FQ, FK, V, NUM, DEN, bh, rows, offs_m, offs_v, state, z, write_den,
                   sqb, sqt, skb, skt, svb, svt, snb, snt, sdb, T, M: tl.constexpr, D: tl.constexpr,
                   C: tl.constexpr):
        """One chunk's outputs from the state before it: num = fq S + tril(fq fk^T) v, and (when
        ``write_den``) den = fq z + rowsum(tril(fq fk^T)). Returns the chunk's fk and v."""
        r_in, m_in, v_in = rows < T, offs_m < M, offs_v < D
        fq = tl.load(FQ + bh * sqb + rows[:, None] * sqt + offs_m[None, :],
                     mask=r_in[:, None] & m_in[None, :], other=0.0)  # [C, M]
        fk = tl.load(FK + bh * skb + rows[:, None] * skt + offs_m[None, :],
                     mask=r_in[:, None] & m_in[None, :], other=0.0)  # [C, M]
        v = tl.load(V + bh * svb + rows[:, None] * svt + offs_v[None, :],
                    mask=r_in[:, None] & v_in[None, :], other=0.0)  # [C, BV]
        c = tl.arange(0, C)
        att = tl.where(c[:, None] >= c[None, :], tl.dot(fq, tl.trans(fk)), 0.0)  # [C, C]
        num = tl.dot(fq, state.to(fq.dtype)) + tl.dot(att.to(v.dtype), v)  # [C, BV]
        tl.store(NUM + bh * snb + rows[:, None] * snt + offs_v[None, :], num, mask=r_in[:, None] & v_in[None, :])
        if write_den:  # the normaliser, once per row
            den = tl.sum(fq.to(tl.float32) * z[None, :], 1) + tl.sum(att, 1)
            tl.store(DEN + bh * sdb + rows, den, mask=r_in)
        return fk, v

    @triton.jit
    def _causal_linear_fwd(
        FQ, FK, V, NUM, DEN,
        sqb, sqt, skb, skt, svb, svt, snb, snt, sdb,
        T,
        M: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, TILE_M: tl.constexpr,
    ):
        """One pass: a program walks the chunks of its (batch x head, value block), state on chip."""
        bh = tl.program_id(0).to(tl.int64)
        vb = tl.program_id(1)
        offs_m = tl.arange(0, TILE_M)
        offs_v = vb * BV + tl.arange(0, BV)
        S = tl.zeros([TILE_M, BV], tl.float32)
        z = tl.zeros([TILE_M], tl.float32)
        for c0 in range(0, T, C):
            fk, v = _chunk_out(FQ, FK, V, NUM, DEN, bh, c0 + tl.arange(0, C), offs_m, offs_v, S, z, vb == 0,
                               sqb, sqt, skb, skt, svb, svt, snb, snt, sdb, T, M, D, C)
            S += tl.dot(tl.trans(fk), v)  # [M, BV]
            z += tl.sum(fk.to(tl.float32), 0)

    @triton.jit
    def _chunk_states(
        FK, V, S, Z,
        skb, skt, svb, svt, ssb, ssc, ssm, szb, szc,
        T, NT,
        M: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
    ):
        """S[bh, c] = sum over the chunks before c of fk^T v (rows mb, columns vb); Z likewise."""
        bh = tl.program_id(0).to(tl.int64)
        mb = tl.program_id(1)
        vb = tl.program_id(2)
        offs_c = tl.arange(0, C)
        offs_m = mb * BM + tl.arange(0, BM)
        offs_v = vb * BV + tl.arange(0, BV)
        m_in, v_in = offs_m < M, offs_v < D
        state = tl.zeros([BM, BV], tl.float32)
        z = tl.zeros([BM], tl.float32)
        for c in range(0, NT):
            tl.store(S + bh * ssb + c * ssc + offs_m[:, None] * ssm + offs_v[None, :], state,
                     mask=m_in[:, None] & v_in[None, :])
            if vb == 0:
                tl.store(Z + bh * szb + c * szc + offs_m, z, mask=m_in)
            rows = c * C + offs_c
            r_in = rows < T
            fk = tl.load(FK + bh * skb + rows[:, None] * skt + offs_m[None, :],
                         mask=r_in[:, None] & m_in[None, :], other=0.0)  # [C, BM]
            v = tl.load(V + bh * svb + rows[:, None] * svt + offs_v[None, :],
                        mask=r_in[:, None] & v_in[None, :], other=0.0)  # [C, BV]
            state += tl.dot(tl.trans(fk), v)
            z += tl.sum(fk.to(tl.float32), 0)

    @triton.jit
    def _chunk_outputs(
        FQ, FK, V, S, Z, NUM, DEN,
        sqb, sqt, skb, skt, svb, svt, ssb, ssc, ssm, szb, szc, snb, snt, sdb,
        T,
        M: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, TILE_M: tl.constexpr,
    ):
        """Two passes, second: every chunk's outputs in parallel, from the stored states."""
        bh = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        vb = tl.program_id(2)
        offs_m = tl.arange(0, TILE_M)
        offs_v = vb * BV + tl.arange(0, BV)
        m_in = offs_m < M
        state = tl.load(S + bh * ssb + c * ssc + offs_m[:, None] * ssm + offs_v[None, :],
                        mask=m_in[:, None] & (offs_v < D)[None, :], other=0.0)  # [M, BV] fp32
        z = tl.load(Z + bh * szb + c * szc + offs_m, mask=m_in, other=0.0)
        _chunk_out(FQ, FK, V, NUM, DEN, bh, c * C + tl.arange(0, C), offs_m, offs_v, state, z, vb == 0,
                   sqb, sqt, skb, skt, svb, svt, snb, snt, sdb, T, M, D, C)


def causal_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, chunk: int = 64,
                            block_v: int = 64, two_pass: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
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
    warps = 8 if tile_m * bv >= 128 * 64 else 4
    if not two_pass:
        _causal_linear_fwd[(B * H, math.ceil(D / bv))](
            fq, fk, v, num, den,
            fq.stride(0), fq.stride(1), fk.stride(0), fk.stride(1), v.stride(0), v.stride(1),
            num.stride(0), num.stride(1), den.stride(0),
            T, M=M, D=D, C=chunk, BV=bv, TILE_M=tile_m, num_warps=warps, num_stages=2,
        )
        return num.view(B, H, T, D), den.view(B, H, T, 1)
    nt = math.ceil(T / chunk)
    states = torch.empty(B * H, nt, tile_m, D, device=v.device, dtype=torch.float32)
    z = torch.empty(B * H, nt, tile_m, device=v.device, dtype=torch.float32)
    bm = min(64, tile_m)
    _chunk_states[(B * H, tile_m // bm, math.ceil(D / bv))](
        fk, v, states, z,
        fk.stride(0), fk.stride(1), v.stride(0), v.stride(1), *states.stride()[:3], z.stride(0), z.stride(1),
        T, nt, M=M, D=D, C=chunk, BM=bm, BV=bv, num_warps=4, num_stages=2,
    )
    _chunk_outputs[(B * H, nt, math.ceil(D / bv))](
        fq, fk, v, states, z, num, den,
        fq.stride(0), fq.stride(1), fk.stride(0), fk.stride(1), v.stride(0), v.stride(1),
        *states.stride()[:3], z.stride(0), z.stride(1), num.stride(0), num.stride(1), den.stride(0),
        T, M=M, D=D, C=chunk, BV=bv, TILE_M=tile_m, num_warps=warps, num_stages=2,
    )
    return num.view(B, H, T, D), den.view(B, H, T, 1)
