"""Causal linear attention in chunks, in Triton: the Performer's causal path.

Given non-negative features fq, fk [B, H, T, M] and values v [B, H, T, D]:

    out_i = num_i / den_i,   num_i = sum_{j <= i} (fq_i . fk_j) v_j,   den_i = sum_{j <= i} fq_i . fk_j

in two passes over chunks of C tokens (the chunked form of flash-linear-attention):
(1) one program per (batch x KV head, block of feature rows, block of value columns) walks
the chunks and stores the state before each one, S_c = sum_{j < c0} fk_j v_j^T [M, D] (in
the inputs' dtype, as the product that reads it takes it) and z_c = sum fk_j (fp32);
(2) one program per (batch x head, chunk, block of value columns; 128 by default) computes
its outputs from
S_c plus the chunk's own lower triangle (fq fk^T, masked), all chunks in parallel, and
writes out = num / den. The states take T / C x M x D values per KV head: linear in T.

``performer_causal`` fuses the Performer's feature map into both passes: from q, k and the
projection W [M, D] each program computes the features of its rows on chip,

    phi(x) = exp(W x' - |x'|^2 / 2 - stab) / sqrt(M),  x' = x / D^(1/4)   (softmax kernel)
    phi(x) = relu(W x') / sqrt(M) + eps                                      (relu kernel)

with stab the row's own maximum for queries and, for keys, the maximum over all keys of the
(batch, KV head), found by a first small pass: the stabilisers of ``methods.performer``, so
nothing of size T x M is written. W enters the products in the inputs' dtype (products
accumulated in fp32): in bf16 its rounding moves a logit by about 0.004 (d = 128), the size
of the rounding of the features themselves to bf16 that the products take.
``causal_linear_attention`` takes the features precomputed (the Performer's padded batches).
The reference is ``methods.performer.Performer._causal_prefix`` (explicit prefix sums);
tests compare. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import math

import torch

from methods.kernels._common import triton, usable  # noqa: F401 - usable re-exported

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _load_wt(W, offs_m, M: tl.constexpr, D: tl.constexpr, FUSED: tl.constexpr = True):
        """W^T [D, BM] (features offs_m), zero past M; nothing (0.0) without the feature map."""
        wt = 0.0
        if FUSED:
            offs_d = tl.arange(0, D)
            wt = tl.load(W + offs_m[None, :] * D + offs_d[:, None], mask=(offs_m < M)[None, :], other=0.0)
        return wt

    @triton.jit
    def _logits(X, wt, base, sxt, rows, T, scale, D: tl.constexpr, RELU: tl.constexpr):
        """[C, BM] fp32: W x' (relu kernel) or W x' - |x'|^2 / 2 (softmax kernel), x' = x * scale,
        of the rows' inputs x [C, D]; wt = W^T [D, BM]."""
        offs_d = tl.arange(0, D)
        x = tl.load(X + base + rows[:, None] * sxt + offs_d[None, :], mask=(rows < T)[:, None], other=0.0)
        lg = tl.dot(x, wt) * scale
        if not RELU:
            xf = x.to(tl.float32) * scale
            lg -= 0.5 * tl.sum(xf * xf, 1)[:, None]
        return lg

    @triton.jit
    def _phi(X, wt, base, sxt, rows, T, offs_m, kstab, scale, inv_m, eps,
             M: tl.constexpr, D: tl.constexpr, FUSED: tl.constexpr, QUERY: tl.constexpr, RELU: tl.constexpr):
        """Features [C, BM] of the rows, in the half-precision dtype of the products: loaded from
        X (FUSED=False: X holds them) or computed from the inputs (queries stabilised by their
        row maximum over all M features, keys by ``kstab``); zero outside the rows and features."""
        ok = (rows < T)[:, None] & (offs_m < M)[None, :]
        if FUSED:
            lg = _logits(X, wt, base, sxt, rows, T, scale, D, RELU)
            if RELU:
                f = tl.maximum(lg, 0.0) * inv_m + eps
            elif QUERY:
                f = tl.exp(lg - tl.max(tl.where(ok, lg, float("-inf")), 1)[:, None]) * inv_m
            else:
                f = tl.exp(lg - kstab) * inv_m
            f = tl.where(ok, f, 0.0).to(wt.dtype)
        else:
            f = tl.load(X + base + rows[:, None] * sxt + offs_m[None, :], mask=ok, other=0.0)
        return f

    @triton.jit
    def _key_logit_max(K, W, KMAX, skb, skt, T, NT, scale,
                       M: tl.constexpr, D: tl.constexpr, C: tl.constexpr, TILE_M: tl.constexpr):
        """KMAX[bh, c]: the largest key logit of chunk c (the keys' stabiliser is their maximum)."""
        bh = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        rows = c * C + tl.arange(0, C)
        offs_m = tl.arange(0, TILE_M)
        lg = _logits(K, _load_wt(W, offs_m, M, D), bh * skb, skt, rows, T, scale, D, False)
        ok = (rows < T)[:, None] & (offs_m < M)[None, :]
        tl.store(KMAX + bh * NT + c, tl.max(tl.max(tl.where(ok, lg, float("-inf")), 1), 0))

    @triton.jit
    def _chunk_states(
        FK, W, KSTAB, V, S, Z,
        skb, skt, svb, svt, ssb, ssc, ssm, szb, szc,
        T, NT, scale, inv_m, eps,
        M: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
        FUSED: tl.constexpr, RELU: tl.constexpr,
    ):
        """Pass 1: S[bh, c] = sum over the chunks before c of fk^T v (rows mb, columns vb); Z likewise."""
        bh = tl.program_id(0).to(tl.int64)
        mb = tl.program_id(1)
        vb = tl.program_id(2)
        offs_m = mb * BM + tl.arange(0, BM)
        offs_v = vb * BV + tl.arange(0, BV)
        m_in, v_in = offs_m < M, offs_v < D
        kstab = tl.load(KSTAB + bh)
        wt = _load_wt(W, offs_m, M, D, FUSED)  # loaded once
        state = tl.zeros([BM, BV], tl.float32)
        z = tl.zeros([BM], tl.float32)
        for c in range(0, NT):
            tl.store(S + bh * ssb + c * ssc + offs_m[:, None] * ssm + offs_v[None, :],
                     state.to(S.dtype.element_ty), mask=m_in[:, None] & v_in[None, :])
            if vb == 0:
                tl.store(Z + bh * szb + c * szc + offs_m, z, mask=m_in)
            rows = c * C + tl.arange(0, C)
            fk = _phi(FK, wt, bh * skb, skt, rows, T, offs_m, kstab, scale, inv_m, eps,
                      M, D, FUSED, False, RELU)  # [C, BM]
            v = tl.load(V + bh * svb + rows[:, None] * svt + offs_v[None, :],
                        mask=(rows < T)[:, None] & v_in[None, :], other=0.0)  # [C, BV]
            state += tl.dot(tl.trans(fk), v)
            z += tl.sum(fk.to(tl.float32), 0)

    @triton.jit
    def _chunk_outputs(
        FQ, FK, W, KSTAB, V, S, Z, O,
        sqb, sqt, skb, skt, svb, svt, ssb, ssc, ssm, szb, szc, sob, sot,
        T, REP, scale, inv_m, eps,
        M: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, TILE_M: tl.constexpr,
        FUSED: tl.constexpr, RELU: tl.constexpr,
    ):
        """Pass 2: every chunk's outputs in parallel, from the stored states: num = fq S +
        tril(fq fk^T) v, den = fq z + rowsum(tril(fq fk^T)), out = num / den."""
        bh = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        vb = tl.program_id(2)
        bk = bh // REP  # the KV head of this (batch, query head)
        rows = c * C + tl.arange(0, C)
        offs_m = tl.arange(0, TILE_M)
        offs_v = vb * BV + tl.arange(0, BV)
        r_in, v_in = rows < T, offs_v < D
        kstab = tl.load(KSTAB + bk)
        wt = _load_wt(W, offs_m, M, D, FUSED)  # loaded once
        fq = _phi(FQ, wt, bh * sqb, sqt, rows, T, offs_m, kstab, scale, inv_m, eps, M, D, FUSED, True, RELU)
        fk = _phi(FK, wt, bk * skb, skt, rows, T, offs_m, kstab, scale, inv_m, eps, M, D, FUSED, False, RELU)
        v = tl.load(V + bk * svb + rows[:, None] * svt + offs_v[None, :],
                    mask=r_in[:, None] & v_in[None, :], other=0.0)  # [C, BV]
        state = tl.load(S + bk * ssb + c * ssc + offs_m[:, None] * ssm + offs_v[None, :],
                        mask=(offs_m < M)[:, None] & v_in[None, :], other=0.0)  # [TILE_M, BV]
        z = tl.load(Z + bk * szb + c * szc + offs_m, mask=offs_m < M, other=0.0)
        i = tl.arange(0, C)
        att = tl.where(i[:, None] >= i[None, :], tl.dot(fq, tl.trans(fk)), 0.0)  # [C, C] fp32
        num = tl.dot(fq, state.to(fq.dtype)) + tl.dot(att.to(v.dtype), v)
        den = tl.sum(fq.to(tl.float32) * z[None, :], 1) + tl.sum(att, 1)
        out = num / tl.maximum(den, 1e-30)[:, None]
        tl.store(O + bh * sob + rows[:, None] * sot + offs_v[None, :], out.to(O.dtype.element_ty),
                 mask=r_in[:, None] & v_in[None, :])


def _two_passes(q, k, v, w, chunk: int, block_v: int | None, relu: bool, eps: float) -> torch.Tensor:
    """The launcher of both entry points: q, k are features (w None) or inputs (w [M, D])."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    B, H, T, _ = q.shape
    Hkv, D = k.shape[1], v.shape[-1]
    fused = w is not None
    M = w.shape[0] if fused else q.shape[-1]
    if M > 256 or D & (D - 1) or D < 16 or H % Hkv or chunk not in (16, 32, 64, 128):
        raise ValueError(f"linear attention kernel: features M <= 256, a power-of-two head dim >= 16, "
                         f"query heads a multiple of KV heads and a chunk of 16-128 tokens; got M={M}, "
                         f"D={D}, H={H}, Hkv={Hkv}, chunk={chunk}")
    dev, dt = v.device, v.dtype
    q, k, v = (x.reshape(B * x.shape[1], T, x.shape[-1]).contiguous() for x in (q, k, v))
    tile_m = max(16, triton.next_power_of_2(M))
    nt, bm, bv_s = math.ceil(T / chunk), min(64, tile_m), min(64, D)  # pass 1's feature and value blocks
    bv = min(block_v or 128, D)  # pass 2's value block
    kstab = torch.zeros(B * Hkv, device=dev, dtype=torch.float32)
    scale = D ** -0.25
    w = v if w is None else w.to(dt).contiguous()  # (unused without the feature map)
    if fused and not relu:
        kmax = torch.empty(B * Hkv, nt, device=dev, dtype=torch.float32)
        _key_logit_max[(B * Hkv, nt)](k, w, kmax, k.stride(0), k.stride(1), T, nt, scale,
                                      M=M, D=D, C=chunk, TILE_M=tile_m, num_warps=4)
        kstab = kmax.amax(1)
    common = dict(M=M, D=D, C=chunk, FUSED=fused, RELU=relu, num_stages=2)
    states = torch.empty(B * Hkv, nt, tile_m, D, device=dev, dtype=dt)
    z = torch.empty(B * Hkv, nt, tile_m, device=dev, dtype=torch.float32)
    _chunk_states[(B * Hkv, tile_m // bm, math.ceil(D / bv_s))](
        k, w, kstab, v, states, z,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *states.stride()[:3], z.stride(0), z.stride(1),
        T, nt, scale, 1 / math.sqrt(M), eps, BM=bm, BV=bv_s, num_warps=4, **common,
    )
    out = torch.empty(B * H, T, D, device=dev, dtype=dt)
    _chunk_outputs[(B * H, nt, math.ceil(D / bv))](
        q, k, w, kstab, v, states, z, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *states.stride()[:3], z.stride(0), z.stride(1), out.stride(0), out.stride(1),
        T, H // Hkv, scale, 1 / math.sqrt(M), eps, TILE_M=tile_m, BV=bv,
        num_warps=8 if tile_m * bv >= 128 * 64 else 4, **common,
    )
    return out.view(B, H, T, D)


def causal_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, chunk: int = 64,
                            block_v: int | None = None) -> torch.Tensor:
    """out [B, H, T, D] in v's dtype from non-negative features fq [B, H, T, M], fk [B, Hkv, T, M]
    and values v [B, Hkv, T, D] (query heads share KV heads in groups of H / Hkv)."""
    return _two_passes(fq, fk, v, None, chunk, block_v, False, 0.0)


def performer_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                     chunk: int = 64, block_v: int | None = None, relu: bool = False, eps: float = 1e-3) -> torch.Tensor:
    """The Performer's causal attention with its feature map fused: q [B, H, T, D], k and v
    [B, Hkv, T, D], projection W [M, D]; out [B, H, T, D] in v's dtype."""
    if not q.shape[-1] == k.shape[-1] == v.shape[-1] == projection.shape[-1]:
        raise ValueError(f"performer_causal: q, k, v and the projection must share the head dim, got "
                         f"{q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}, {projection.shape[-1]}")
    return _two_passes(q, k, v, projection, chunk, block_v, relu, eps)
