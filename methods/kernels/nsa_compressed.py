"""NSA's compressed branch in Triton (Yuan et al. 2025, Eq. 7-9), forward and backward, and the
selection that follows it: importance of each selection block and top-n.

nsa_compressed_attention(q, kc, vc, l, d): q [B, H, T, D], kc, vc [B, Hkv, n, D] (compressed
keys/values of blocks of l tokens every d) -> o_cmp [B, H, T, D] and the base-2 LSE [B, H, T]
of each query over the blocks ending at or before it. nsa_importance: selection-block
importance [B, Hkv, rows, ceil(T / l')] (fp32), summed over the group's heads; nsa_topn: each
token's chosen blocks [B, Hkv, rows, n] int32. nsa_compressed: both, for tests / small shapes.
Backward: ``NSACompressedAttention`` (autograd Function) for o_cmp (dQ by query tile, dK and
dV of the compressed keys by key tile); importance and top-n are not differentiable.
"""
from __future__ import annotations

import math

import torch

from methods.kernels._common import LOG2E, NSA_LAUNCH, _check, _delta, _tile, triton

if triton is not None:
    import triton.language as tl

    from methods.kernels._common import _dkdv_step, _dq_step, _online_softmax_step, _row_inputs

    @triton.jit
    def _all_see(row, CL, CS, NC, BLOCK_N: tl.constexpr):
        """The compressed blocks that query ``row`` (and every later one) sees, rounded down to
        whole tiles of BLOCK_N: block i ends at i * CS + CL - 1."""
        n = tl.where(row >= CL - 1, (row - CL + 1) // CS + 1, 0)
        return tl.minimum(n, NC) // BLOCK_N * BLOCK_N

    @triton.jit
    def _nsa_cmp_fwd(
        Q, KC, VC, O, LSE,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh,
        H, REP, T, NC, CL, CS, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):
        """o_cmp and the log-sum-exp (base 2) of each query over the compressed blocks that end
        at or before it (block i ends at i * CS + CL - 1)."""
        qt = tl.num_programs(0) - 1 - tl.program_id(0)  # heavy (late) tiles first
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*T*D passes 2^31 at 1M tokens
        b, h = bh // H, bh % H
        hk = h // REP
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                    mask=offs_m[:, None] < T, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        last = tl.minimum(qt * BLOCK_M + BLOCK_M - 1, T - 1)
        n_vis = tl.minimum(tl.maximum((last - CL + 1) // CS + 1, 0), NC)  # blocks any row sees
        n_full = _all_see(qt * BLOCK_M, CL, CS, NC, BLOCK_N)
        kbase, vbase = KC + b * skb + hk * skh, VC + b * svb + hk * svh
        for j0 in range(0, n_full, BLOCK_N):  # tiles every row sees: no mask, the loop pipelines
            offs_n = j0 + tl.arange(0, BLOCK_N)
            k = tl.load(kbase + offs_n[None, :] * skt + offs_d[:, None])
            v = tl.load(vbase + offs_n[:, None] * svt + offs_d[None, :])
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, True, qk_scale)
        for j0 in range(n_full, n_vis, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            k = tl.load(KC + b * skb + hk * skh + offs_n[None, :] * skt + offs_d[:, None],
                        mask=offs_n[None, :] < NC, other=0.0)
            v = tl.load(VC + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :],
                        mask=offs_n[:, None] < NC, other=0.0)
            ok = (offs_n[None, :] * CS + CL - 1 <= offs_m[:, None]) & (offs_n[None, :] < NC)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, ok, qk_scale)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
        lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=offs_m < T)

    @triton.jit
    def _nsa_importance(
        Q, KC, LSE, IMP,
        sqb, sqh, sqt, skb, skh, skt, slb, slh, sib, sih, sit,
        HKV, G, T, NC, NSEL, CL, CS, BS, qk_scale, ROW0, ROWS,
        BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NS: tl.constexpr,
        D: tl.constexpr, ATOMIC: tl.constexpr = False,
    ):
        """imp[t - ROW0, s] for rows ROW0 <= t < ROWS: the sum over the group's heads and the
        compressed blocks i overlapping selection block s of p[t, i] (Eq. 9-10), p recomputed
        from the log-sum-exp. A program takes BLOCK_T tokens with all heads of their group as
        the rows of one tile (row r: token r // BLOCK_G, head r % BLOCK_G), so each compressed
        key tile is multiplied once per group; it owns its tokens, so accumulates without atomics
        (ATOMIC: adds each tile's contribution as a fire-and-forget atomic instead of a read,
        add and write; with the default block sizes at most two tiles add to an entry, so their
        order does not change the sum)."""
        qt = tl.program_id(0)
        bhk = tl.program_id(1).to(tl.int64)
        b, hk = bhk // HKV, bhk % HKV
        R: tl.constexpr = BLOCK_T * BLOCK_G
        offs_r = tl.arange(0, R)
        tok = ROW0 + qt * BLOCK_T + offs_r // BLOCK_G
        g = offs_r % BLOCK_G
        rin = (g < G) & (tok < ROWS)
        h = hk * G + g
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h[:, None] * sqh + tok[:, None] * sqt + offs_d[None, :],
                    mask=rin[:, None], other=0.0)
        lse = tl.load(LSE + b * slb + h * slh + tok, mask=rin, other=float("inf"))
        offs_t = ROW0 + qt * BLOCK_T + tl.arange(0, BLOCK_T)
        last = tl.minimum(ROW0 + qt * BLOCK_T + BLOCK_T - 1, ROWS - 1)
        n_vis = tl.minimum(tl.maximum((last - CL + 1) // CS + 1, 0), NC)
        # rows outside (padding heads, tokens past ROWS) have lse = inf: p = 0 without a mask
        n_full = _all_see(ROW0 + qt * BLOCK_T, CL, CS, NC, BLOCK_N)
        kbase = KC + b * skb + hk * skh
        ibase = IMP + b * sib + hk * sih + (offs_t - ROW0)[:, None] * sit
        tin = offs_t[:, None] < ROWS
        for j0 in range(0, n_full, BLOCK_N):  # tiles every row sees: no mask, the loop pipelines
            offs_n = j0 + tl.arange(0, BLOCK_N)
            p = tl.exp2(tl.dot(q, tl.load(kbase + offs_n[None, :] * skt + offs_d[:, None])) * qk_scale
                        - lse[:, None])
            _importance_add(p, ibase, tin, j0, offs_n, NSEL, CL, CS, BS, BLOCK_T, BLOCK_G, BLOCK_N, NS, ATOMIC)
        for j0 in range(n_full, n_vis, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            k = tl.load(kbase + offs_n[None, :] * skt + offs_d[:, None], mask=offs_n[None, :] < NC, other=0.0)
            ok = (offs_n[None, :] * CS + CL - 1 <= tok[:, None]) & (offs_n[None, :] < NC)
            p = tl.where(ok, tl.exp2(tl.dot(q, k) * qk_scale - lse[:, None]), 0.0)
            _importance_add(p, ibase, tin, j0, offs_n, NSEL, CL, CS, BS, BLOCK_T, BLOCK_G, BLOCK_N, NS, ATOMIC)

    @triton.jit
    def _importance_add(p, ibase, tin, j0, offs_n, NSEL, CL, CS, BS, BLOCK_T: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NS: tl.constexpr, ATOMIC: tl.constexpr):
        """Adds the probabilities p [BLOCK_T * BLOCK_G, BLOCK_N] of compressed blocks j0 .. (rows:
        token-major, the group's heads) to the importance rows at ``ibase`` of the selection
        blocks they overlap, summed over the heads, each weighted by the tokens the two share
        over the stride (NSA's Eq. 9 as the overlap of token ranges; ``methods.nsa``)."""
        # the selection blocks this tile touches: s0 .. s0 + NS - 1
        offs_s = tl.arange(0, NS)
        s0 = (j0 * CS) // BS
        sel = offs_s[None, :] + s0
        start = (offs_n * CS)[:, None]
        shared = tl.minimum(start + CL, (sel + 1) * BS) - tl.maximum(start, sel * BS)  # [BLOCK_N, NS]
        hit = (tl.maximum(shared, 0).to(tl.float32) / CS).to(p.dtype)
        p = tl.sum(tl.reshape(p, [BLOCK_T, BLOCK_G, BLOCK_N]), axis=1)
        if BLOCK_T >= 16:
            contrib = tl.dot(p, hit, input_precision="ieee")  # [BLOCK_T, NS]
        else:  # too few rows for a dot
            contrib = tl.sum(p[:, :, None] * hit[None, :, :], axis=1)
        live = tin & (sel < NSEL)
        if ATOMIC:  # fire and forget: the loop does not wait for the read
            tl.atomic_add(ibase + sel, contrib, mask=live, sem="relaxed")
        else:
            tl.store(ibase + sel, tl.load(ibase + sel, mask=live, other=0.0) + contrib, mask=live)


if triton is not None:

    @triton.jit
    def _nsa_topn(IMP, SEL, sib, sih, sit, ssb, ssh, sst, HKV, NSEL, T0, BS,
                  NOUT: tl.constexpr, TILE: tl.constexpr):
        """Row r (query T0 + r) of KV head hk: its NOUT best selection blocks, best first, the
        first block and the query's own two forced in, blocks after its own out (-1: none)."""
        r = tl.program_id(0)
        bhk = tl.program_id(1).to(tl.int64)
        b, hk = bhk // HKV, bhk % HKV
        cur = (T0 + r) // BS
        j = tl.arange(0, TILE)
        x = tl.load(IMP + b * sib + hk * sih + r * sit + j, mask=j < NSEL, other=float("-inf"))
        x = tl.where((j == 0) | (j == cur) | (j == cur - 1), float("inf"), x)
        x = tl.where(j > cur, float("-inf"), x)
        for i in tl.static_range(NOUT):
            best = tl.argmax(x, 0)
            top = tl.max(x, 0)
            tl.store(SEL + b * ssb + hk * ssh + r * sst + i, tl.where(top > float("-inf"), best, -1))
            x = tl.where(j == best, float("-inf"), x)


def nsa_topn(importance: torch.Tensor, t0: int, block_size: int, n: int, warps=None) -> torch.Tensor | None:
    """``NSA.select`` in one kernel: importance [B, Hkv, c, nsel] of queries t0 .. t0 + c - 1 ->
    their chosen blocks [B, Hkv, c, min(n, nsel)] int32 (-1 where fewer are visible). None
    where a row does not fit on chip (nsel > 4096 selection blocks): callers use ``select``.
    One row a program, on ``warps`` warps (default ``NSA_LAUNCH["topn"]``)."""
    B, Hkv, c, nsel = importance.shape
    if nsel > 4096:
        return None
    imp = importance.contiguous()
    out = torch.empty(B, Hkv, c, min(n, nsel), device=imp.device, dtype=torch.int32)
    _nsa_topn[(c, B * Hkv)](imp, out, *imp.stride()[:3], *out.stride()[:3], Hkv, nsel, t0, block_size,
                            NOUT=out.shape[-1], TILE=_tile(nsel), num_warps=warps or NSA_LAUNCH["topn"])
    return out


def nsa_compressed(q, kc, vc, block_size: int, compress_block: int, compress_stride: int, scale=None):
    """NSA's compressed branch and the selection-block importance of every query (tests and
    small shapes; ``nsa_compressed_attention`` + ``nsa_importance`` bound the memory).

    q [B, H, T, D]; kc, vc [B, Hkv, n, D] (compressed keys and values, in q's dtype).
    Returns o_cmp [B, H, T, D] (q's dtype) and importance [B, Hkv, T, ceil(T / block_size)]
    (fp32), the same quantities as ``methods.nsa.NSA._compressed`` computes in PyTorch."""
    out, lse = nsa_compressed_attention(q, kc, vc, compress_block, compress_stride, scale)
    return out, nsa_importance(q, kc, lse, block_size, compress_block, compress_stride, 0, q.shape[2], scale)


def nsa_compressed_attention(q, kc, vc, compress_block: int, compress_stride: int, scale=None, launch=None):
    """o_cmp [B, H, T, D] and the log-sum-exp (base 2, fp32) [B, H, T] of each query over the
    compressed blocks that end at or before it. ``launch``: (block_m, block_n, warps, stages).
    With gradients enabled on q, kc or vc: ``NSACompressedAttention`` (the LSE without one)."""
    q, kc, vc = _check(q, kc, vc)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, kc, vc)):
        return NSACompressedAttention.apply(q, kc, vc, compress_block, compress_stride, scale)
    B, H, T, D = q.shape
    Hkv, n = kc.shape[1], kc.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty_like(q)  # the kernel writes every row
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = launch or NSA_LAUNCH["compressed"]
    _nsa_cmp_fwd[(math.ceil(T / bm), B * H)](
        q, kc, vc, out, lse,
        *q.stride()[:3], *kc.stride()[:3], *vc.stride()[:3], *out.stride()[:3], lse.stride(0), lse.stride(1),
        H, H // Hkv, T, n, compress_block, compress_stride, scale * LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, D=D, num_warps=warps, num_stages=stages,
    )
    return out, lse


def nsa_importance(q, kc, lse, block_size: int, compress_block: int, compress_stride: int,
                   row0: int, row1: int, scale=None, launch=None):
    """Selection-block importance [B, Hkv, row1 - row0, ceil(T / block_size)] (fp32) of the
    queries row0 .. row1 - 1 (row0 a multiple of 64), from ``nsa_compressed_attention``'s
    log-sum-exp: callers bound its memory by taking the rows in chunks. ``launch``: (rows,
    block_n, warps, stages[, atomic]), rows: a program's query rows (tokens x the group's heads,
    padded to a power of two); atomic: 1 to add each tile's contribution atomically."""
    q, kc = q.contiguous(), kc.contiguous()
    B, H, T, D = q.shape
    Hkv, n = kc.shape[1], kc.shape[2]
    if row0 % 64 or not 0 <= row0 < row1 <= T:
        raise ValueError(f"rows {row0}..{row1} must start at a multiple of 64 inside 0..{T}")
    nsel = math.ceil(T / block_size)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    imp = torch.zeros(B, Hkv, row1 - row0, nsel, device=q.device, dtype=torch.float32)
    rows, bn, warps, stages, *atomic = launch or NSA_LAUNCH["importance" if H > Hkv else "importance_mha"]
    bg = triton.next_power_of_2(H // Hkv)
    bt = max(1, rows // bg)  # tokens a program takes (all heads of their group: bt * bg rows)
    span = (bn - 1) * compress_stride + compress_block  # tokens a tile of compressed blocks covers
    ns = _tile(span // block_size + 2)
    _nsa_importance[(math.ceil((row1 - row0) / bt), B * Hkv)](
        q, kc, lse, imp,
        *q.stride()[:3], *kc.stride()[:3], lse.stride(0), lse.stride(1), *imp.stride()[:3],
        Hkv, H // Hkv, T, n, nsel, compress_block, compress_stride, block_size, scale * LOG2E, row0, row1,
        BLOCK_T=bt, BLOCK_G=bg, BLOCK_N=bn, NS=ns, D=D, ATOMIC=bool(atomic and atomic[0]),
        num_warps=warps, num_stages=stages,
    )
    return imp


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
