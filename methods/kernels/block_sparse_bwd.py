"""Backward of the block-sparse attention kernel (FlashAttention-2 style, same tile lists).

The forward stores each row's log-sum-exp; the backward recomputes the probabilities tile by
tile: dQ by query tile over the key tiles it visited (the forward's lists), dK and dV by key
tile over the query tiles that visited it (the transposed lists). With grouped-query
attention dK and dV are computed per query head and summed over each group. Tested against
autograd through ``methods.base.masked_attention`` (tests/test_kernels.py).
"""
from __future__ import annotations

import math

import torch

from methods.kernels.block_sparse import LOG2E, _num_warps, _tile, layout_to_lists, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _mask(offs_m, offs_n, OFFSET, TK, wl, wr, sink, KPM, kpm_row, BLOCK_N: tl.constexpr,
              TILE_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
        kin = (tl.arange(0, TILE_N) < BLOCK_N) & (offs_n < TK)  # inside the pattern block
        dq = (offs_m + OFFSET)[:, None] - offs_n[None, :]
        ok = kin[None, :] & (((dq < wl) & (dq > -wr)) | (offs_n[None, :] < sink))
        if CAUSAL:
            ok = ok & (dq >= 0)
        if HAS_KPM:
            ok = ok & (tl.load(KPM + kpm_row + offs_n, mask=kin, other=0) != 0)[None, :]
        return ok, kin

    @triton.jit
    def _bwd_dq(
        Q, K, V, DO, LSE, DELTA, DQ, IDX, CNT, WL, WR, SINK, KPM,
        sqb, sqh, sqt, skb, skh, skt, sib, sih, siq, scb, sch, skpb,
        H, REP, TQ, TK, OFFSET, qk_scale, scale,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TILE_M: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr,
    ):
        qt = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*T*D passes 2^31 at 1M tokens
        b, h = bh // H, bh % H
        hk = h // REP
        wl, wr, sink = tl.load(WL + h), tl.load(WR + h), tl.load(SINK + h)
        offs_m = qt * BLOCK_M + tl.arange(0, TILE_M)
        qin = (tl.arange(0, TILE_M) < BLOCK_M) & (offs_m < TQ)
        offs_d = tl.arange(0, D)
        rows = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]  # q, do, dq alike
        q = tl.load(Q + rows, mask=qin[:, None], other=0.0)
        do = tl.load(DO + rows, mask=qin[:, None], other=0.0)
        lse = tl.load(LSE + bh * TQ + offs_m, mask=qin, other=float("inf"))
        delta = tl.load(DELTA + bh * TQ + offs_m, mask=qin, other=0.0)
        dq = tl.zeros([TILE_M, D], tl.float32)
        n = tl.load(CNT + b * scb + h * sch + qt)
        for j in range(0, n):
            kt = tl.load(IDX + b * sib + h * sih + qt * siq + j)
            offs_n = kt * BLOCK_N + tl.arange(0, TILE_N)
            ok, kin = _mask(offs_m, offs_n, OFFSET, TK, wl, wr, sink, KPM, b * skpb, BLOCK_N, TILE_N,
                            CAUSAL, HAS_KPM)
            kv = b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
            k = tl.load(K + kv, mask=kin[:, None], other=0.0)
            v = tl.load(V + kv, mask=kin[:, None], other=0.0)
            p = tl.where(ok, tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + rows, (dq * scale).to(DQ.dtype.element_ty), mask=qin[:, None])

    @triton.jit
    def _bwd_dkdv(
        Q, K, V, DO, LSE, DELTA, DK, DV, TIDX, TCNT, WL, WR, SINK, KPM,
        sqb, sqh, sqt, skb, skh, skt, sdb, sdh, sdt, sib, sih, siq, scb, sch, skpb,
        H, REP, TQ, TK, OFFSET, qk_scale, scale,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TILE_M: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr,
    ):
        kt = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*T*D passes 2^31 at 1M tokens
        b, h = bh // H, bh % H
        hk = h // REP
        wl, wr, sink = tl.load(WL + h), tl.load(WR + h), tl.load(SINK + h)
        offs_n = kt * BLOCK_N + tl.arange(0, TILE_N)
        offs_d = tl.arange(0, D)
        kv = b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
        kin0 = (tl.arange(0, TILE_N) < BLOCK_N) & (offs_n < TK)
        k = tl.load(K + kv, mask=kin0[:, None], other=0.0)
        v = tl.load(V + kv, mask=kin0[:, None], other=0.0)
        dk = tl.zeros([TILE_N, D], tl.float32)
        dv = tl.zeros([TILE_N, D], tl.float32)
        n = tl.load(TCNT + b * scb + h * sch + kt)
        for j in range(0, n):
            qt = tl.load(TIDX + b * sib + h * sih + kt * siq + j)
            offs_m = qt * BLOCK_M + tl.arange(0, TILE_M)
            qin = (tl.arange(0, TILE_M) < BLOCK_M) & (offs_m < TQ)
            rows = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
            q = tl.load(Q + rows, mask=qin[:, None], other=0.0)
            do = tl.load(DO + rows, mask=qin[:, None], other=0.0)
            lse = tl.load(LSE + bh * TQ + offs_m, mask=qin, other=float("inf"))
            delta = tl.load(DELTA + bh * TQ + offs_m, mask=qin, other=0.0)
            ok, kin = _mask(offs_m, offs_n, OFFSET, TK, wl, wr, sink, KPM, b * skpb, BLOCK_N, TILE_N,
                            CAUSAL, HAS_KPM)
            ok = ok & qin[:, None]
            p = tl.where(ok, tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)  # [M, N]
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        out = b * sdb + h * sdh + offs_n[:, None] * sdt + offs_d[None, :]
        tl.store(DK + out, dk * scale, mask=kin0[:, None])
        tl.store(DV + out, dv, mask=kin0[:, None])


def transpose_lists(idx, cnt, n_other: int):
    """Tile lists [.., nq, m] of key tiles per query tile -> lists of query tiles per key tile."""
    nq = idx.shape[-2]
    live = torch.arange(idx.shape[-1], device=idx.device) < cnt.unsqueeze(-1)
    lay = torch.zeros(*idx.shape[:-1], n_other + 1, dtype=torch.bool, device=idx.device)
    lay.scatter_(-1, torch.where(live, idx, n_other).long(), True)
    return layout_to_lists(lay[..., :n_other].transpose(-1, -2)[..., :nq])


class BlockSparseAttention(torch.autograd.Function):
    """``block_sparse_attention`` with gradients (all heads; the forward stores the LSE)."""

    @staticmethod
    def forward(ctx, q, k, v, idx, cnt, block_m, block_n, causal, win_l, win_r, sink, kpm, scale, nin=None):
        from methods.kernels.block_sparse import block_sparse_attention

        B, H, T, D = q.shape
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        with torch.no_grad():
            out = block_sparse_attention(q, k, v, idx, cnt, block_m=block_m, block_n=block_n,
                                         causal=causal, win_l=win_l, win_r=win_r, sink=sink,
                                         key_padding_mask=kpm, scale=scale, lse=lse, nin=nin)
        ctx.save_for_backward(q, k, v, out, lse, idx, cnt, win_l, win_r, sink,
                              kpm if kpm is not None else cnt)
        ctx.cfg = (block_m, block_n, causal, kpm is not None, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, idx, cnt, wl, wr, sink, kpm = ctx.saved_tensors
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # do and dq share q's strides
        bm, bn, causal, has_kpm, scale = ctx.cfg
        B, H, TQ, D = q.shape
        Hkv, TK = k.shape[1], k.shape[2]
        do = do.contiguous()
        delta = (do.float() * out.float()).sum(-1).contiguous()  # [B, H, TQ]
        kpm_u8 = kpm.to(torch.uint8).contiguous() if has_kpm else cnt
        sb = lambda t: t.stride(0) if t.shape[0] > 1 else 0  # noqa: E731
        sh = lambda t: t.stride(1) if t.shape[1] > 1 else 0  # noqa: E731
        common = dict(CAUSAL=causal, HAS_KPM=has_kpm, BLOCK_M=bm, BLOCK_N=bn, TILE_M=_tile(bm),
                      TILE_N=_tile(bn), D=D, num_warps=_num_warps(bm, D), num_stages=2)
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        _bwd_dq[(math.ceil(TQ / bm), B * H)](
            q, k, v, do, lse, delta, dq, idx, cnt, wl, wr, sink, kpm_u8,
            *q.stride()[:3], *k.stride()[:3], sb(idx), sh(idx), idx.stride(2), sb(cnt), sh(cnt),
            kpm_u8.stride(0) if has_kpm else 0,
            H, H // Hkv, TQ, TK, TK - TQ, scale * LOG2E, scale, **common)
        nk = math.ceil(TK / bn)
        tidx, tcnt = transpose_lists(idx, cnt, nk)
        dk = torch.empty(B, H, TK, D, device=q.device, dtype=torch.float32)  # per query head
        dv = torch.empty_like(dk)
        _bwd_dkdv[(nk, B * H)](
            q, k, v, do, lse, delta, dk, dv, tidx, tcnt, wl, wr, sink, kpm_u8,
            *q.stride()[:3], *k.stride()[:3], *dk.stride()[:3], sb(tidx), sh(tidx), tidx.stride(2),
            sb(tcnt), sh(tcnt), kpm_u8.stride(0) if has_kpm else 0,
            H, H // Hkv, TQ, TK, TK - TQ, scale * LOG2E, scale, **common)
        rep = H // Hkv
        dk = dk.view(B, Hkv, rep, TK, D).sum(2).to(k.dtype)
        dv = dv.view(B, Hkv, rep, TK, D).sum(2).to(v.dtype)
        return dq, dk, dv, *([None] * 11)


__all__ = ["BlockSparseAttention", "transpose_lists"]
