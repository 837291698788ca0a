"""NSA's selected-attention branch in Triton (Yuan et al. 2025, Eq. 10-12), forward and backward.

nsa_selected_attention(q, k, v, sel, block_size): q [B, H, T, D], k, v [B, Hkv, T, D], sel
[B, Hkv, T, n] int32 (each token's chosen key blocks, -1: none; shared by a GQA group). Each
token attends causally to its selected blocks. Per token (one program a token and group), or
for small groups (at most NSA_SMALL_GROUP heads) by key block over the tokens that chose it
(``nsa_block_tokens``: the choices sorted by block), each token's partial outputs merged after.
Backward: ``NSASelectedAttention`` (autograd Function): dQ per token over its blocks (by key
block for small groups), dK and dV per key block over the tokens that chose it.
"""
from __future__ import annotations

import math

import torch

from methods.kernels._common import LOG2E, NSA_LAUNCH, _check, _delta, _tile, triton

NSA_SMALL_GROUP = 4  # groups of at most this many query heads: the selection by key block


if triton is not None:
    import triton.language as tl

    from methods.kernels._common import _dkdv_step, _dq_step, _online_softmax_step, _row_inputs

    @triton.jit
    def _nsa_selected_fwd(
        Q, K, V, O, SEL, LSE,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, ssb, ssh, sst,
        HKV, G, T, NSEL, qk_scale,
        BLOCK_G: tl.constexpr, BS: tl.constexpr, TILE_S: tl.constexpr, D: tl.constexpr,
        STORE_LSE: tl.constexpr = False,
    ):
        t = tl.program_id(0)
        bhk = tl.program_id(1).to(tl.int64)
        b, hk = bhk // HKV, bhk % HKV
        offs_g = tl.arange(0, BLOCK_G)
        heads = hk * G + offs_g
        gin = offs_g < G
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + heads[:, None] * sqh + t * sqt + offs_d[None, :],
                    mask=gin[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for j in range(0, NSEL):
            blk = tl.load(SEL + b * ssb + hk * ssh + t * sst + j)
            offs_n = blk * BS + tl.arange(0, TILE_S)  # blk = -1 (no block): all negative
            kin = (tl.arange(0, TILE_S) < BS) & (offs_n >= 0) & (offs_n <= t)  # causal
            k = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skt + offs_d[:, None],
                        mask=kin[None, :], other=0.0)
            v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :],
                        mask=kin[:, None], other=0.0)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, kin[None, :], qk_scale)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b * sob + heads[:, None] * soh + t * sot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=gin[:, None])
        if STORE_LSE:  # base-2 log-sum-exp per (head, token) [B, H, T], for the backward
            lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(LSE + (b * HKV * G + heads) * T + t, lse, mask=gin)


    @triton.jit
    def _nsa_work_item(WORK, HKV, TK, BS, TILE_S: tl.constexpr):
        """This program's work item of ``nsa_block_tokens``: (b * HKV + hk, b, hk, first, end)
        and its key block's positions and which of them exist."""
        w = tl.program_id(0)
        bhk = tl.load(WORK + w * 4).to(tl.int64)
        offs_n = tl.load(WORK + w * 4 + 1) * BS + tl.arange(0, TILE_S)
        kin = (tl.arange(0, TILE_S) < BS) & (offs_n < TK)
        return bhk, bhk // HKV, bhk % HKV, tl.load(WORK + w * 4 + 2), tl.load(WORK + w * 4 + 3), offs_n, kin

    @triton.jit
    def _nsa_sel_fwd_blocks(
        Q, K, V, OP, LP, ENT, WORK,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, spb, sph, spe, slb, slh,
        HKV, G, T0, TK, NE, NSEL, qk_scale,
        BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BS: tl.constexpr, TILE_S: tl.constexpr, D: tl.constexpr,
    ):
        """The selection by key block (FSA's order, for small groups): work item (b * HKV + hk,
        block, first, end) loads its block's keys and values once and attends the choices
        ENT[b * HKV + hk, first:end] (token * NSEL + slot, token counted from T0) to it, BLOCK_T
        tokens x the group's heads a tile; each choice's normalised output goes to
        OP[b, head, choice] and its base-2 log-sum-exp to LP (``_nsa_sel_combine`` merges them)."""
        bhk, b, hk, first, end, offs_n, kin = _nsa_work_item(WORK, HKV, TK, BS, TILE_S)
        offs_d = tl.arange(0, D)
        k = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skt + offs_d[:, None], mask=kin[None, :], other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kin[:, None], other=0.0)
        R: tl.constexpr = BLOCK_T * BLOCK_G
        offs_r = tl.arange(0, R)
        g = offs_r % BLOCK_G
        heads = hk * G + g
        for i in range(first, end, BLOCK_T):
            at = i + offs_r // BLOCK_G
            rin = (at < end) & (g < G)
            e = tl.load(ENT + bhk * NE + at, mask=rin, other=0)
            tok = e // NSEL
            q = tl.load(Q + b * sqb + heads[:, None] * sqh + tok[:, None] * sqt + offs_d[None, :],
                        mask=rin[:, None], other=0.0)
            ok = rin[:, None] & kin[None, :] & (offs_n[None, :] <= (tok + T0)[:, None])  # causal
            s = tl.where(ok, tl.dot(q, k) * qk_scale, float("-inf"))
            m = tl.max(s, 1)
            m = tl.where(m == float("-inf"), 0.0, m)
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, 1)
            o = tl.dot(p.to(v.dtype), v) / tl.where(l == 0.0, 1.0, l)[:, None]
            tl.store(OP + b * spb + heads[:, None] * sph + e[:, None] * spe + offs_d[None, :],
                     o.to(OP.dtype.element_ty), mask=rin[:, None])
            lp = tl.where(l == 0.0, float("-inf"), m + tl.log2(tl.where(l == 0.0, 1.0, l)))
            tl.store(LP + b * slb + heads * slh + e, lp, mask=rin)

    @triton.jit
    def _nsa_sel_combine(
        OP, LP, O, LSE, spb, sph, spe, slb, slh, sob, soh, sot, sLb, sLh,
        H, C, NSEL, BLOCK_M: tl.constexpr, TILE_J: tl.constexpr, D: tl.constexpr, STORE_LSE: tl.constexpr,
    ):
        """Each token's output from its choices' partial outputs: weights 2^(lp_j - lse)."""
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rin = rows < C
        j = tl.arange(0, TILE_J)
        lpb = LP + b * slb + h * slh
        lp = tl.load(lpb + rows[:, None] * NSEL + j[None, :], mask=rin[:, None] & (j < NSEL)[None, :],
                     other=float("-inf"))
        mx = tl.max(lp, 1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        tot = tl.sum(tl.exp2(lp - mx[:, None]), 1)
        lse = mx + tl.log2(tl.where(tot == 0.0, 1.0, tot))
        offs_d = tl.arange(0, D)
        acc = tl.zeros([BLOCK_M, D], LP.dtype.element_ty)  # fp32 (fp64 for fp64 inputs)
        for jj in range(0, NSEL):
            lpj = tl.load(lpb + rows * NSEL + jj, mask=rin, other=float("-inf"))
            live = lpj > float("-inf")
            o = tl.load(OP + b * spb + h * sph + (rows * NSEL + jj)[:, None] * spe + offs_d[None, :],
                        mask=live[:, None], other=0.0)
            acc += tl.where(live, tl.exp2(lpj - lse), 0.0)[:, None] * o.to(LP.dtype.element_ty)
        tl.store(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=rin[:, None])
        if STORE_LSE:  # inf: nothing kept
            tl.store(LSE + b * sLb + h * sLh + rows, tl.where(tot == 0.0, float("inf"), lse), mask=rin)


def nsa_block_tokens(sel: torch.Tensor, nblocks: int, segment: int):
    """The transpose of NSA's selection: sel [B, Hkv, T, n] (-1: none) -> (ent [B * Hkv, T * n]
    int32, the choices (token * n + slot) sorted by the block chosen, and work [items, 4] int32
    of (b * Hkv + hk, block, first, end): each block's run of ent cut into segments of at most
    ``segment`` choices (block 0, chosen by every token, would otherwise be one program's whole
    sequence)."""
    B, Hkv, T, n = sel.shape
    key = torch.where(sel >= 0, sel, nblocks).reshape(B * Hkv, T * n).long()
    skey, order = key.sort(dim=-1, stable=True)
    bounds = torch.searchsorted(skey, torch.arange(nblocks + 1, device=sel.device).expand(B * Hkv, -1).contiguous())
    start, count = bounds[:, :-1].reshape(-1), (bounds[:, 1:] - bounds[:, :-1]).reshape(-1)  # per (bhk, block)
    nseg = (count + segment - 1) // segment
    item = torch.repeat_interleave(torch.arange(len(nseg), device=sel.device), nseg)  # one host sync
    first_item = torch.cumsum(nseg, 0) - nseg
    first = start[item] + (torch.arange(len(item), device=sel.device) - first_item[item]) * segment
    end = torch.minimum(first + segment, start[item] + count[item])
    work = torch.stack([item // nblocks, item % nblocks, first, end], 1).to(torch.int32).contiguous()
    return order.to(torch.int32).contiguous(), work


NSA_BLOCK_BYTES = 1 << 30  # the selection by key block: partial outputs held at once (tokens chunked)


def nsa_selected_attention(q, k, v, sel, block_size: int, scale=None, launch=None, lse=None):
    """Each token attends causally to the key blocks ``sel[b, hk, t, :]`` (-1: none), shared
    by the query heads of KV head hk. q [B, H, T, D]; k, v [B, Hkv, T, D]; sel [B, Hkv, T, n].
    ``launch``: (order, segment, warps, stages[, tile rows]); order 0: one program per token and
    KV head (``_nsa_selected_fwd``); 1: one per key block and segment of the choices of it, then a merge
    of each token's partial outputs (``_nsa_sel_fwd_blocks``: each block loaded once per segment,
    not once per token; for groups of few heads). Default ``NSA_LAUNCH["selected"]`` or
    ``["selected_small"]`` (groups of at most ``NSA_SMALL_GROUP`` heads). ``lse`` [B, H, T] fp32,
    when given, receives each row's base-2 log-sum-exp. With gradients enabled on q, k or v:
    ``NSASelectedAttention``."""
    q, k, v = _check(q, k, v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return NSASelectedAttention.apply(q, k, v, sel, block_size, scale)
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    sel = sel.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    small = G <= NSA_SMALL_GROUP
    order, segment, warps, stages, *rows = launch or NSA_LAUNCH["selected_small" if small else "selected"]
    if order:
        _nsa_selected_by_block(q, k, v, sel, block_size, scale, out, lse, segment, warps, stages, *rows)
        return out
    _nsa_selected_fwd[(T, B * Hkv)](
        q, k, v, out, sel, lse if lse is not None else sel,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *sel.stride()[:3],
        Hkv, G, T, sel.shape[-1], scale * LOG2E,
        BLOCK_G=_tile(G), BS=block_size, TILE_S=_tile(block_size), D=D, STORE_LSE=lse is not None,
        num_warps=warps, num_stages=stages,
    )
    return out


def _nsa_selected_by_block(q, k, v, sel, bs, scale, out, lse, segment, warps, stages, tile_rows=64):
    """``nsa_selected_attention`` in FSA's order, by chunks of tokens whose partial outputs
    (n per token and head, in q's dtype) fit in ``NSA_BLOCK_BYTES``; ``tile_rows``: the rows
    (tokens x the group's heads) of a program's tile."""
    B, H, T, D = q.shape
    Hkv, n = k.shape[1], sel.shape[-1]
    G = H // Hkv
    bg = triton.next_power_of_2(G)  # a tile's rows: tile_rows // bg tokens x the group's heads
    rows = max(64, NSA_BLOCK_BYTES // (B * H * n * D * q.element_size()) // 64 * 64)
    for a in range(0, T, rows):
        c = min(rows, T - a)
        ent, work = nsa_block_tokens(sel[:, :, a:a + c], math.ceil(T / bs), segment)
        op = torch.empty(B, H, c * n, D, device=q.device, dtype=q.dtype)
        lp = torch.full((B, H, c * n), float("-inf"), device=q.device,
                        dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        qa, oa = q[:, :, a:a + c], out[:, :, a:a + c]
        if len(work):
            _nsa_sel_fwd_blocks[(len(work),)](
                qa, k, v, op, lp, ent, work,
                *qa.stride()[:3], *k.stride()[:3], *v.stride()[:3], *op.stride()[:3], *lp.stride()[:2],
                Hkv, G, a, T, ent.shape[1], n, scale * LOG2E,
                BLOCK_T=max(1, tile_rows // bg), BLOCK_G=bg, BS=bs, TILE_S=_tile(bs), D=D,
                num_warps=warps, num_stages=stages,
            )
        la = lse[:, :, a:a + c] if lse is not None else lp
        bm = 64
        _nsa_sel_combine[(math.ceil(c / bm), B * H)](
            op, lp, oa, la, *op.stride()[:3], *lp.stride()[:2], *oa.stride()[:3], *la.stride()[:2],
            H, c, n, BLOCK_M=bm, TILE_J=_tile(n), D=D, STORE_LSE=lse is not None, num_warps=4,
        )


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
        by_block = G <= NSA_SMALL_GROUP  # dQ too by key block (added atomically), as the forward
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
