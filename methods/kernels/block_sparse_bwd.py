"""Backward kernels (FlashAttention-2 style) of the block-sparse attention and NSA's branches.

The forward stores each row's log-sum-exp; the backward recomputes the probabilities tile by
tile: dQ by query tile over the key tiles it visited (the forward's lists), dK and dV by key
tile over the query tiles that visited it (the transposed lists). With grouped-query
attention dK and dV are computed per query head and summed over each group.

NSASelectedAttention     NSA's selection: dQ per token over its blocks; dK and dV per key
                         block over the tokens that chose it (``nsa_block_tokens``: the choices
                         sorted by block, runs cut into segments, added atomically); for groups
                         of few heads dQ there too (each row's dS K added atomically).
NSACompressedAttention   NSA's compressed branch: dQ by query tile, dK and dV of the compressed
                         keys by key tile and query head.

Tested against autograd through dense PyTorch computations (tests/test_kernels.py).
"""
from __future__ import annotations

import math

import torch

from methods.kernels import block_sparse as _bsk
from methods.kernels.block_sparse import (
    LOG2E,
    _num_warps,
    _tile,
    layout_to_lists,
    nsa_block_tokens,
    triton,
)

if triton is not None:
    import triton.language as tl

    from methods.kernels.block_sparse import _nsa_work_item

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
    def _row_inputs(Q, DO, LSE, DELTA, rows, stat, live):
        """A tile's query rows and their output gradients (offsets ``rows`` [M, D]) and their
        LSE and dO*O row sums (offsets ``stat`` [M]); rows not ``live`` see nothing (LSE inf)."""
        q = tl.load(Q + rows, mask=live[:, None], other=0.0)
        do = tl.load(DO + rows, mask=live[:, None], other=0.0)
        lse = tl.load(LSE + stat, mask=live, other=float("inf"))
        return q, do, lse, tl.load(DELTA + stat, mask=live, other=0.0)

    @triton.jit
    def _dq_step(dq, q, do, k, v, ok, lse, delta, qk_scale):
        """One key tile k, v [N, D] for query rows q, do [M, D]: the probabilities recomputed
        from the rows' LSE under ``ok`` [M, N], dq += dS K."""
        p = tl.where(ok, tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k)

    @triton.jit
    def _dkdv_step(dk, dv, k, v, q, do, ok, lse, delta, qk_scale):
        """One tile of query rows q, do [M, D] for keys k, v [N, D], key-major (``ok`` [N, M]):
        dv += P^T dO, dk += dS^T Q (unscaled); also returns dS^T [N, M] in q's dtype."""
        pt = tl.where(ok, tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dst = (pt * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(q.dtype)
        return dk + tl.dot(dst, q), dv, dst

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
        q, do, lse, delta = _row_inputs(Q, DO, LSE, DELTA, rows, bh * TQ + offs_m, qin)
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
            dq = _dq_step(dq, q, do, k, v, ok, lse, delta, qk_scale)
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
            q, do, lse, delta = _row_inputs(Q, DO, LSE, DELTA, rows, bh * TQ + offs_m, qin)
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


def _delta(do, out):
    """Each row's sum of dO * O in fp32 [B, H, T]: the softmax backward's correction term."""
    return (do.float() * out.float()).sum(-1).contiguous()


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
        delta = _delta(do, out)
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


# ---- NSA's selection branch: each token's own key blocks --------------------------------
if triton is not None:

    @triton.jit
    def _nsa_sel_bwd_dq(
        Q, K, V, DO, LSE, DELTA, DQ, SEL,
        sqb, sqh, sqt, skb, skh, skt, ssb, ssh, sst,
        HKV, G, T, NSEL, qk_scale, scale,
        BLOCK_G: tl.constexpr, BS: tl.constexpr, TILE_S: tl.constexpr, D: tl.constexpr,
    ):
        """dQ of token t's rows (the heads of KV head hk) over its selected blocks, as the forward
        visits them. q, do and dq share q's strides; LSE, DELTA [B, H, T]."""
        t = tl.program_id(0)
        bhk = tl.program_id(1).to(tl.int64)
        b, hk = bhk // HKV, bhk % HKV
        offs_g = tl.arange(0, BLOCK_G)
        heads = hk * G + offs_g
        gin = offs_g < G
        offs_d = tl.arange(0, D)
        rows = b * sqb + heads[:, None] * sqh + t * sqt + offs_d[None, :]
        q, do, lse, delta = _row_inputs(Q, DO, LSE, DELTA, rows, (b * HKV * G + heads) * T + t, gin)
        dq = tl.zeros([BLOCK_G, D], tl.float32)
        for j in range(0, NSEL):
            blk = tl.load(SEL + b * ssb + hk * ssh + t * sst + j)
            offs_n = blk * BS + tl.arange(0, TILE_S)  # blk = -1 (no block): all negative
            kin = (tl.arange(0, TILE_S) < BS) & (offs_n >= 0) & (offs_n <= t)  # causal
            kv = b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
            k = tl.load(K + kv, mask=kin[:, None], other=0.0)
            v = tl.load(V + kv, mask=kin[:, None], other=0.0)
            dq = _dq_step(dq, q, do, k, v, kin[None, :], lse, delta, qk_scale)
        tl.store(DQ + rows, (dq * scale).to(DQ.dtype.element_ty), mask=gin[:, None])

    @triton.jit
    def _nsa_sel_bwd_dkdv(
        Q, K, V, DO, LSE, DELTA, DK, DV, ENT, WORK, DQ,
        sqb, sqh, sqt, skb, skh, skt, sdb, sdh, sdt, sgb, sgh, sgt,
        HKV, G, T, NE, NSEL, qk_scale, scale,
        BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BS: tl.constexpr, TILE_S: tl.constexpr,
        D: tl.constexpr, WITH_DQ: tl.constexpr = False,
    ):
        """dK and dV of one key block from a segment of the tokens that selected it: work item
        (b * HKV + hk, block, first, end) indexes ENT [B * HKV, NE], the choices (token * NSEL +
        slot) sorted by the block they chose (``nsa_block_tokens``). Rows: BLOCK_T tokens x the
        group's heads (token-major). Adds into the fp32 DK, DV [B, HKV, T, D] (a block's tokens
        may span several items); WITH_DQ: also each row's dS K into the fp32 DQ [B, H, T, D]
        (strides sgb, sgh, sgt), for groups of few heads, where the per-token dQ kernel would
        load each block once per token."""
        bhk, b, hk, first, end, offs_n, kin = _nsa_work_item(WORK, HKV, T, BS, TILE_S)
        offs_d = tl.arange(0, D)
        kv = b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
        k = tl.load(K + kv, mask=kin[:, None], other=0.0)
        v = tl.load(V + kv, mask=kin[:, None], other=0.0)
        dk = tl.zeros([TILE_S, D], tl.float32)
        dv = tl.zeros([TILE_S, D], tl.float32)
        R: tl.constexpr = BLOCK_T * BLOCK_G
        offs_r = tl.arange(0, R)
        g = offs_r % BLOCK_G
        heads = hk * G + g
        for i in range(first, end, BLOCK_T):
            at = i + offs_r // BLOCK_G
            rin = (at < end) & (g < G)
            tok = tl.load(ENT + bhk * NE + at, mask=rin, other=0) // NSEL
            rows = b * sqb + heads[:, None] * sqh + tok[:, None] * sqt + offs_d[None, :]
            q, do, lse, delta = _row_inputs(Q, DO, LSE, DELTA, rows, (b * HKV * G + heads) * T + tok, rin)
            ok = kin[:, None] & rin[None, :] & (offs_n[:, None] <= tok[None, :])  # [keys, rows]
            dk, dv, dst = _dkdv_step(dk, dv, k, v, q, do, ok, lse, delta, qk_scale)
            if WITH_DQ:
                dq = tl.dot(tl.trans(dst), k) * scale  # [rows, D]
                tl.atomic_add(DQ + b * sgb + heads[:, None] * sgh + tok[:, None] * sgt + offs_d[None, :], dq,
                              mask=rin[:, None], sem="relaxed")
        out = b * sdb + hk * sdh + offs_n[:, None] * sdt + offs_d[None, :]
        tl.atomic_add(DK + out, dk * scale, mask=kin[:, None])
        tl.atomic_add(DV + out, dv, mask=kin[:, None])


class NSASelectedAttention(torch.autograd.Function):
    """``nsa_selected_attention`` with gradients: the forward stores each row's LSE; dQ per token
    over its blocks, dK and dV per key block over the tokens that chose it (``nsa_block_tokens``)."""

    segment = 256  # tokens a dK/dV program takes at most

    @staticmethod
    def forward(ctx, q, k, v, sel, block_size, scale):
        from methods.kernels.block_sparse import nsa_selected_attention

        B, H, T, D = q.shape
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        sel = sel.to(torch.int32).contiguous()
        with torch.no_grad():
            out = nsa_selected_attention(q, k, v, sel, block_size, scale, lse=lse)
        ctx.save_for_backward(q, k, v, out, lse, sel)
        ctx.cfg = (block_size, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, sel = ctx.saved_tensors
        q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
        bs, scale = ctx.cfg
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        delta = _delta(do, out)
        by_block = G <= _bsk.NSA_SMALL_GROUP  # dQ too by key block (added atomically), as the forward
        if by_block:
            dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        else:
            dq = torch.empty_like(q)
            _nsa_sel_bwd_dq[(T, B * Hkv)](
                q, k, v, do, lse, delta, dq, sel, *q.stride()[:3], *k.stride()[:3], *sel.stride()[:3],
                Hkv, G, T, sel.shape[-1], scale * LOG2E, scale,
                BLOCK_G=_tile(G), BS=bs, TILE_S=_tile(bs), D=D, num_warps=2, num_stages=2)
        nblocks = math.ceil(T / bs)
        ent, work = nsa_block_tokens(sel, nblocks, NSASelectedAttention.segment)
        dk = torch.zeros(B, Hkv, T, D, device=q.device, dtype=torch.float32)
        dv = torch.zeros_like(dk)
        bg = triton.next_power_of_2(G)
        if len(work):
            _nsa_sel_bwd_dkdv[(len(work),)](
                q, k, v, do, lse, delta, dk, dv, ent, work, dq, *q.stride()[:3], *k.stride()[:3], *dk.stride()[:3],
                *dq.stride()[:3], Hkv, G, T, ent.shape[1], sel.shape[-1], scale * LOG2E, scale,
                BLOCK_T=max(1, 64 // bg), BLOCK_G=bg, BS=bs, TILE_S=_tile(bs), D=D, WITH_DQ=by_block,
                num_warps=4, num_stages=2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# ---- NSA's compressed branch: attention over the compressed keys -----------------------
if triton is not None:

    @triton.jit
    def _nsa_cmp_bwd_dq(
        Q, KC, VC, DO, LSE, DELTA, DQ,
        sqb, sqh, sqt, skb, skh, skt,
        H, REP, T, NC, CL, CS, qk_scale, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):
        """dQ of a query tile over the compressed blocks its rows see (block i: i * CS + CL - 1 <=
        t). q, do and dq share q's strides; LSE, DELTA [B, H, T]."""
        qt = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        hk = h // REP
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        qin = offs_m < T
        rows = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
        q, do, lse, delta = _row_inputs(Q, DO, LSE, DELTA, rows, bh * T + offs_m, qin)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        last = tl.minimum(qt * BLOCK_M + BLOCK_M - 1, T - 1)
        n_vis = tl.minimum(tl.maximum((last - CL + 1) // CS + 1, 0), NC)
        for j0 in range(0, n_vis, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            kin = offs_n < NC
            kv = b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
            k = tl.load(KC + kv, mask=kin[:, None], other=0.0)
            v = tl.load(VC + kv, mask=kin[:, None], other=0.0)
            ok = (offs_n[None, :] * CS + CL - 1 <= offs_m[:, None]) & kin[None, :]
            dq = _dq_step(dq, q, do, k, v, ok, lse, delta, qk_scale)
        tl.store(DQ + rows, (dq * scale).to(DQ.dtype.element_ty), mask=qin[:, None])

    @triton.jit
    def _nsa_cmp_bwd_dkdv(
        Q, KC, VC, DO, LSE, DELTA, DK, DV,
        sqb, sqh, sqt, skb, skh, skt, sdb, sdh, sdt,
        H, REP, T, NC, CL, CS, qk_scale, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):
        """dK and dV of a tile of compressed blocks for one query head, over the query tiles
        from the first that sees its first block (DK, DV [B, H, NC, D] fp32: summed over each
        group by the caller)."""
        jt = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        hk = h // REP
        offs_n = jt * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        kin = offs_n < NC
        kv = b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
        k = tl.load(KC + kv, mask=kin[:, None], other=0.0)
        v = tl.load(VC + kv, mask=kin[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        t0 = jt * BLOCK_N * CS + CL - 1  # the first query that sees the tile's first block
        for m0 in range(t0 // BLOCK_M * BLOCK_M, T, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            qin = offs_m < T
            rows = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
            q, do, lse, delta = _row_inputs(Q, DO, LSE, DELTA, rows, bh * T + offs_m, qin)
            ok = (offs_n[:, None] * CS + CL - 1 <= offs_m[None, :]) & kin[:, None] & qin[None, :]
            dk, dv, _ = _dkdv_step(dk, dv, k, v, q, do, ok, lse, delta, qk_scale)
        out = b * sdb + h * sdh + offs_n[:, None] * sdt + offs_d[None, :]
        tl.store(DK + out, dk * scale, mask=kin[:, None])
        tl.store(DV + out, dv, mask=kin[:, None])


class NSACompressedAttention(torch.autograd.Function):
    """``nsa_compressed_attention`` with gradients for q and the compressed keys and values:
    returns (o_cmp, lse), the log-sum-exp not differentiable (it feeds the selection)."""

    tiles = (64, 64)  # the backward's query and compressed-key tiles

    @staticmethod
    def forward(ctx, q, kc, vc, compress_block, compress_stride, scale):
        from methods.kernels.block_sparse import nsa_compressed_attention

        D = q.shape[-1]
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        with torch.no_grad():
            out, lse = nsa_compressed_attention(q, kc, vc, compress_block, compress_stride, scale)
        ctx.save_for_backward(q, kc, vc, out, lse)
        ctx.cfg = (compress_block, compress_stride, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, kc, vc, out, lse = ctx.saved_tensors
        q, kc, vc, do = q.contiguous(), kc.contiguous(), vc.contiguous(), do.contiguous()
        cl, cs, scale = ctx.cfg
        B, H, T, D = q.shape
        Hkv, NC = kc.shape[1], kc.shape[2]
        delta = _delta(do, out)
        bm, bn = NSACompressedAttention.tiles
        dq = torch.empty_like(q)
        _nsa_cmp_bwd_dq[(math.ceil(T / bm), B * H)](
            q, kc, vc, do, lse, delta, dq, *q.stride()[:3], *kc.stride()[:3],
            H, H // Hkv, T, NC, cl, cs, scale * LOG2E, scale, BLOCK_M=bm, BLOCK_N=bn, D=D, num_warps=4, num_stages=2)
        dk = torch.empty(B, H, NC, D, device=q.device, dtype=torch.float32)  # per query head
        dv = torch.empty_like(dk)
        if NC:
            _nsa_cmp_bwd_dkdv[(math.ceil(NC / bn), B * H)](
                q, kc, vc, do, lse, delta, dk, dv, *q.stride()[:3], *kc.stride()[:3], *dk.stride()[:3],
                H, H // Hkv, T, NC, cl, cs, scale * LOG2E, scale, BLOCK_M=bm, BLOCK_N=bn, D=D, num_warps=4,
                num_stages=2)
        rep = H // Hkv
        dk = dk.view(B, Hkv, rep, NC, D).sum(2).to(kc.dtype)
        dv = dv.view(B, Hkv, rep, NC, D).sum(2).to(vc.dtype)
        return dq, dk, dv, None, None, None


__all__ = ["BlockSparseAttention", "NSACompressedAttention", "NSASelectedAttention",
           "transpose_lists"]
