"""Triton kernels that skip masked work: block-sparse attention, vertical-slash, NSA selection.

All three are FlashAttention-style forwards (online softmax in fp32, exp2) over lists of
what each query tile visits, with the exact element mask applied inside a visited tile, so
each computes the same function as its method's dense-mask reference.

block_sparse_attention   query tile i visits the key tiles ``idx[b, h, i, :cnt[b, h, i]]``;
                         inside, keys are kept when causal (end-aligned), within a window
                         (``-win_r < q - k < win_l``) or a sink (``k < sink``), and not padded.
                         Serves sliding window, BigBird, MInference A-shape and block-sparse,
                         and NSA's window branch.
vertical_slash_attention causal; pair (q, k) is kept when column k is a vertical or diagonal
                         q - k a slash. Phase A visits the key tiles that slashes cross (with
                         the element mask), phase B gathers the vertical columns outside them.
nsa_selected_attention   each token attends to its selected key blocks (causally); one
                         program serves all query heads of a GQA group, which share the blocks;
                         for small groups, by key block over the tokens that chose it, each
                         token's partial outputs merged after (``nsa_block_tokens``).
nsa_compressed_attention NSA's compressed branch and its log-sum-exp; ``nsa_importance`` and
                         ``nsa_topn`` turn them into each token's selected blocks. SparseK's
                         attention by query tiles and threshold bisection are below too.
With gradients enabled, block_sparse, nsa_selected and nsa_compressed attention dispatch to the
autograd functions of ``block_sparse_bwd`` (vertical-slash and SparseK are forward only).

The references are ``methods.base.masked_attention`` with the matching masks (tests compare).
Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (fp32/fp16 there).
"""
from __future__ import annotations

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

LOG2E = 1.4426950408889634
BIG = 2**30  # "no window"
# launch settings of NSA's kernels: compressed (block_m, block_n, num_warps, num_stages);
# importance (rows: tokens x the group's heads, block_n, warps, stages[, atomic add]), one
# setting for groups of several heads and one for a head alone (MHA); selected (order, segment,
# warps, stages: per token, its tile is its block; or by key block for groups of at most
# NSA_SMALL_GROUP heads); topn: warps (one row a program). scripts/tune_nsa.py times
# alternatives at 64k (kernels/tune_nsa_f73bb5b.jsonl, paper shape and MHA: importance 17.4 ->
# 9.4 ms and 106 -> 24 ms, compressed 12.0 -> 9.9, top-n 3.5 -> 2.4; tune_nsa_mha_f839956:
# MHA importance added atomically 24 -> 16 ms; tune_nsa_sel*_4fcb193: the selection by key
# block, MHA 118 -> 18 ms, groups of 16 heads 15 per token against 27)
NSA_LAUNCH = {"compressed": (128, 64, 8, 3), "importance": (256, 32, 8, 3), "importance_mha": (128, 32, 4, 2, 1),
              "selected": (0, 0, 2, 2), "selected_small": (1, 256, 4, 1), "topn": 1}
NSA_SMALL_GROUP = 4  # groups of at most this many query heads: the selection by key block


def usable(q: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors (CUDA, or the CPU interpreter)."""
    if triton is None:
        return False
    return q.is_cuda or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, q, k, v, ok, qk_scale):
        """One tile: scores q @ k ([M, D] x [D, N]) under ``ok`` (True: no mask), folded into
        (acc, m, l)."""
        return _softmax_update(acc, m_i, l_i, tl.dot(q, k), qk_scale, v, ok)

    @triton.jit
    def _softmax_update(acc, m_i, l_i, s, scale, v, ok):
        """Scores ``s * scale`` (base 2, scale > 0) of a tile under ``ok``, folded into (acc, m, l).
        As FlashAttention-2: the scale goes into one multiply-add with the row maximum, and the
        rescaled accumulator into the product's accumulator."""
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
        p = tl.exp2(s * scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, m_new, l_i

    @triton.jit
    def _block_sparse_fwd(
        Q, K, V, O, IDX, CNT, NIN, WL, WR, SINK, KPM, LSE,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        sib, sih, siq, scb, sch, skpb,
        H, REP, TQ, TK, OFFSET, NQT, qk_scale,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TILE_M: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr, STORE_LSE: tl.constexpr = False,
    ):
        # pattern blocks of BLOCK_M x BLOCK_N inside power-of-two tiles TILE_M x TILE_N
        qt = NQT - 1 - tl.program_id(0)  # heavy (late, causal) tiles first
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*T*D passes 2^31 at 1M tokens
        b, h = bh // H, bh % H
        hk = h // REP
        wl, wr, sink = tl.load(WL + h), tl.load(WR + h), tl.load(SINK + h)
        offs_m = qt * BLOCK_M + tl.arange(0, TILE_M)
        qin = (tl.arange(0, TILE_M) < BLOCK_M) & (offs_m < TQ)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                    mask=qin[:, None], other=0.0)
        pos = offs_m + OFFSET  # query positions among the keys
        m_i = tl.full([TILE_M], float("-inf"), tl.float32)
        l_i = tl.zeros([TILE_M], tl.float32)
        acc = tl.zeros([TILE_M, D], tl.float32)
        n = tl.load(CNT + b * scb + h * sch + qt)
        n_in = 0
        if (TILE_N == BLOCK_N) and (not HAS_KPM):  # the first n_in tiles lie wholly inside the mask
            n_in = tl.load(NIN + b * scb + h * sch + qt)
        kbase, vbase = K + b * skb + hk * skh, V + b * svb + hk * svh
        for j in range(0, n_in):  # no element mask and no branch: the loop pipelines
            offs_n = tl.load(IDX + b * sib + h * sih + qt * siq + j) * BLOCK_N + tl.arange(0, TILE_N)
            k = tl.load(kbase + offs_n[None, :] * skt + offs_d[:, None])
            v = tl.load(vbase + offs_n[:, None] * svt + offs_d[None, :])
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, True, qk_scale)
        for j in range(n_in, n):  # tiles the mask cuts (diagonal, window edges, sinks, padding)
            offs_n = tl.load(IDX + b * sib + h * sih + qt * siq + j) * BLOCK_N + tl.arange(0, TILE_N)
            kin = (tl.arange(0, TILE_N) < BLOCK_N) & (offs_n < TK)
            k = tl.load(kbase + offs_n[None, :] * skt + offs_d[:, None], mask=kin[None, :], other=0.0)
            v = tl.load(vbase + offs_n[:, None] * svt + offs_d[None, :], mask=kin[:, None], other=0.0)
            dq = pos[:, None] - offs_n[None, :]
            ok = kin[None, :] & (((dq < wl) & (dq > -wr)) | (offs_n[None, :] < sink))
            if CAUSAL:
                ok = ok & (dq >= 0)
            if HAS_KPM:
                ok = ok & (tl.load(KPM + b * skpb + offs_n, mask=kin, other=0) != 0)[None, :]
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, ok, qk_scale)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=qin[:, None])
        if STORE_LSE:  # base-2 log-sum-exp of each row, for the backward (inf: nothing kept)
            lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(LSE + bh * TQ + offs_m, lse, mask=qin)

    @triton.jit
    def _vertical_slash_fwd(
        Q, K, V, O, VBIT, SBIT, DELTA, DCNT, VCOL, VCNT, BDIAG,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        sbb, sbh, sdb, sdh, sdq, svcb, svch, svnb, svnh, sgb, sgh,
        H, REP, T, NQT, qk_scale,
        BLOCK: tl.constexpr, D: tl.constexpr,
    ):
        qt = NQT - 1 - tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*T*D passes 2^31 at 1M tokens
        b, h = bh // H, bh % H
        hk = h // REP
        offs_m = qt * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                    mask=offs_m[:, None] < T, other=0.0)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, D], tl.float32)
        kbase, vbase = K + b * skb + hk * skh, V + b * svb + hk * svh
        # phase A: the key tiles crossed by a slash (tile qt - delta), exact element mask
        n = tl.load(DCNT + b * sdb + h * sdh + qt)
        for j in range(0, n):
            kt = qt - tl.load(DELTA + b * sdb + h * sdh + j * sdq)
            offs_n = kt * BLOCK + tl.arange(0, BLOCK)
            kin = offs_n < T
            k = tl.load(kbase + offs_n[None, :] * skt + offs_d[:, None], mask=kin[None, :], other=0.0)
            v = tl.load(vbase + offs_n[:, None] * svt + offs_d[None, :], mask=kin[:, None], other=0.0)
            dq = offs_m[:, None] - offs_n[None, :]
            causal = (dq >= 0) & kin[None, :]
            sl = tl.load(SBIT + b * sbb + h * sbh + dq, mask=causal, other=0)
            vt = tl.load(VBIT + b * sbb + h * sbh + offs_n, mask=kin, other=0)
            ok = causal & ((sl != 0) | (vt != 0)[None, :])
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, ok, qk_scale)
        # phase B: vertical columns at or before the tile's last query, outside phase A tiles
        nv = tl.load(VCNT + b * svnb + h * svnh + qt)
        for j0 in range(0, nv, BLOCK):
            jj = j0 + tl.arange(0, BLOCK)
            live = jj < nv
            col = tl.load(VCOL + b * svcb + h * svch + jj, mask=live, other=0)
            in_a = tl.load(BDIAG + b * sgb + h * sgh + qt - col // BLOCK, mask=live, other=1)
            k = tl.load(kbase + col[None, :] * skt + offs_d[:, None], mask=live[None, :], other=0.0)
            v = tl.load(vbase + col[:, None] * svt + offs_d[None, :], mask=live[:, None], other=0.0)
            ok = (live & (in_a == 0))[None, :] & (offs_m[:, None] >= col[None, :])
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, ok, qk_scale)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)

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


def _check(q, k, v):
    if triton is None:
        raise RuntimeError("triton is not installed")
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head dim >= 16, got {D}")
    return (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))


def _tile(n: int) -> int:
    """The power-of-two tile (at least 16, for tl.dot) that holds ``n``."""
    return max(16, triton.next_power_of_2(n))


def _num_warps(block_m: int, D: int) -> int:
    return 8 if block_m * D >= 128 * 128 else 4


# ---- plans: what each query tile visits -------------------------------------------------
def layout_to_lists(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., nq, nk] bool -> (idx [..., nq, max] int32 of the kept key tiles, cnt [..., nq])."""
    nk = layout.shape[-1]
    ar = torch.arange(nk, device=layout.device, dtype=torch.int32)
    keyed = torch.where(layout, ar, torch.full_like(ar, nk))
    cnt = layout.sum(-1, dtype=torch.int32)
    width = max(1, int(cnt.max()) if cnt.numel() else 1)
    idx = keyed.sort(-1).values[..., :width].contiguous()
    return idx, cnt.contiguous()


def window_layout(tq, tk, block_m, block_n, causal, win_l, win_r, sink, device) -> torch.Tensor:
    """[P, nq, nk] bool: the key tiles holding a pair that the window/sink/causal mask keeps
    (per program head p, from its win_l, win_r, sink: [P] int tensors)."""
    off = tk - tq
    nq, nk = math.ceil(tq / block_m), math.ceil(tk / block_n)
    qs = torch.arange(nq, device=device).view(1, nq, 1) * block_m + off
    qe = torch.minimum(qs + block_m - 1, torch.full_like(qs, tq - 1 + off))
    ks = torch.arange(nk, device=device).view(1, 1, nk) * block_n
    ke = torch.clamp(ks + block_n - 1, max=tk - 1)
    wl, wr, sk = (x.to(device).view(-1, 1, 1) for x in (win_l, win_r, sink))
    dmin, dmax = qs - ke, qe - ks  # range of q - k over the tile pair
    if causal:
        dmin = dmin.clamp_min(0)
    inside = (dmin <= dmax) & (dmin < wl) & (dmax > -wr)
    sinks = (ks < sk) & ((ks <= qe) if causal else True)
    return inside | sinks


def inside_first(idx, cnt, *, block_m, block_n, causal, win_l=None, win_r=None, sink=None, tq, tk):
    """Each query tile's list reordered so that the key tiles wholly inside the mask (every
    pair kept: no diagonal, window edge or sequence end crosses them) come first, in their
    order: (idx, cnt, nin), nin [B|1, H|1, nq] their count. The kernel runs those without an
    element mask or a branch. win_l, win_r, sink: [H|1] as ``block_sparse_attention`` takes."""
    par = lambda x, val: (torch.full((1,), val) if x is None else torch.as_tensor(x).reshape(-1)).to(idx.device)  # noqa: E731
    wl, wr, sk = par(win_l, BIG), par(win_r, BIG), par(sink, 0)
    hp = max(len(wl), len(wr), len(sk))
    if hp > 1 and idx.shape[1] == 1:  # lists shared by heads whose masks differ: one per head
        idx, cnt = idx.expand(-1, hp, -1, -1), cnt.expand(-1, hp, -1)
    wl, wr, sk = (x.view(1, -1, 1, 1) for x in (wl, wr, sk))
    nq, m = idx.shape[-2:]
    qs = (torch.arange(nq, device=idx.device) * block_m + (tk - tq)).view(nq, 1)  # first query position
    k0 = idx.long() * block_n
    dmin, dmax = qs - (k0 + block_n - 1), qs + block_m - 1 - k0  # q - k over the tile pair
    inside = (k0 + block_n <= tk) & (((dmax < wl) & (dmin > -wr)) | (k0 + block_n <= sk))
    if causal:
        inside = inside & (dmin >= 0)
    live = torch.arange(m, device=idx.device) < cnt.unsqueeze(-1)
    inside = inside & live
    rank = torch.arange(m, device=idx.device) + m * (~inside).long() + m * (~live).long()
    order = rank.argsort(-1)
    return (idx.gather(-1, order).contiguous(), cnt.contiguous(),
            inside.sum(-1, dtype=torch.int32).contiguous())


@functools.lru_cache(maxsize=16)
def window_lists(T: int, block_m: int, block_n: int, causal: bool, win_l: tuple, win_r: tuple,
                 sink: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tile lists (idx [1, H|1, nq, m], cnt, nin; cached; ``inside_first`` order) of a
    window/sink pattern over T tokens: one list when every head has the same window and
    sink, one per head otherwise."""
    if len(set(zip(win_l, win_r, sink))) == 1:
        win_l, win_r, sink = win_l[:1], win_r[:1], sink[:1]
    lay = window_layout(T, T, block_m, block_n, causal, *(torch.tensor(x) for x in (win_l, win_r, sink)),
                        device)
    return inside_first(*layout_to_lists(lay.unsqueeze(0)), block_m=block_m, block_n=block_n, causal=causal,
                        win_l=win_l, win_r=win_r, sink=sink, tq=T, tk=T)


def block_sparse_attention(q, k, v, idx, cnt, *, block_m, block_n, causal, win_l=None, win_r=None,
                           sink=None, key_padding_mask=None, scale=None, num_warps=None, num_stages=3,
                           lse=None, nin=None):
    """Attention over the key tiles listed per query tile (see the module docstring).

    q [B, H, Tq, D]; k, v [B, Hkv, Tk, D]; idx [B|1, H|1, nq, m] and cnt [B|1, H|1, nq];
    win_l, win_r, sink: [H|1] ints (default: no window, no sink). ``lse`` [B, H, Tq] fp32, when
    given, receives each row's base-2 log-sum-exp (for the backward). ``nin``: the lists are
    in ``inside_first`` order with this count (cached plans pass it; else it is computed).
    """
    q, k, v = _check(q, k, v)
    B, H, tq, D = q.shape
    tk = k.shape[2]
    dev = q.device
    full = lambda x, val: (torch.full((H,), val, dtype=torch.int32, device=dev) if x is None  # noqa: E731
                           else x.to(dev, torch.int32).expand(H).contiguous())
    win_l, win_r, sink = full(win_l, BIG), full(win_r, BIG), full(sink, 0)
    nqt = math.ceil(tq / block_m)
    kpm = key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None else cnt
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    sb = lambda t: t.stride(0) if t.shape[0] > 1 else 0  # noqa: E731 - plans shared by the batch
    sh = lambda t: t.stride(1) if t.shape[1] > 1 else 0  # noqa: E731 - and by the heads
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        from methods.kernels.block_sparse_bwd import BlockSparseAttention

        return BlockSparseAttention.apply(q, k, v, idx, cnt, block_m, block_n, causal, win_l, win_r,
                                          sink, key_padding_mask, scale, nin)
    if nin is None:
        idx, cnt, nin = inside_first(idx, cnt, block_m=block_m, block_n=block_n, causal=causal, win_l=win_l,
                                     win_r=win_r, sink=sink, tq=tq, tk=tk)
    if nin.shape != cnt.shape:
        raise ValueError(f"nin {tuple(nin.shape)} must have cnt's shape {tuple(cnt.shape)}")
    out = torch.empty_like(q)
    _block_sparse_fwd[(nqt, B * H)](
        q, k, v, out, idx, cnt, nin, win_l, win_r, sink, kpm, lse if lse is not None else cnt,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        sb(idx), sh(idx), idx.stride(2), sb(cnt), sh(cnt),
        kpm.stride(0) if key_padding_mask is not None else 0,
        H, H // k.shape[1], tq, tk, tk - tq, nqt, scale * LOG2E,
        CAUSAL=causal, HAS_KPM=key_padding_mask is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        TILE_M=_tile(block_m), TILE_N=_tile(block_n), D=D, STORE_LSE=lse is not None,
        num_warps=num_warps or _num_warps(block_m, D), num_stages=num_stages,
    )
    return out


def tile_work(cnt: torch.Tensor, block_m: int, block_n: int, B: int, P: int) -> float:
    """(query, key) pairs a block-sparse launch computes: visited tiles x tile area."""
    return float(cnt.sum()) * block_m * block_n * (B // cnt.shape[0]) * (P // cnt.shape[1])


def vertical_slash_plan(vert: torch.Tensor, slash: torch.Tensor, block: int) -> dict:
    """Index sets -> what each query tile visits. vert, slash: [B, H, T] bool (key columns;
    diagonals q - k). Tiles are square (``block``), so whether a slash crosses tile pair
    (i, j) depends on i - j only: ``bdiag[b, h, i - j]``."""
    B, H, T = vert.shape
    nt = math.ceil(T / block)
    dev = vert.device
    cs = torch.nn.functional.pad(slash.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
    delta = torch.arange(nt, device=dev)
    lo = (delta * block - (block - 1)).clamp(0, T)
    hi = (delta * block + block).clamp(0, T)  # exclusive
    bdiag = (cs[..., hi] - cs[..., lo]) > 0  # [B, H, nt]
    bdiag[..., 0] |= True  # the diagonal tile: always visited (it holds q - k = 0)
    dsort = torch.where(bdiag, delta, torch.full_like(delta, nt)).sort(-1).values.to(torch.int32)
    qt = torch.arange(nt, device=dev, dtype=torch.int32)
    dcnt = torch.searchsorted(dsort.contiguous(), qt.expand(B, H, nt).contiguous(), right=True).to(torch.int32)
    cols = torch.where(vert, torch.arange(T, device=dev), torch.full_like(vert, T, dtype=torch.long))
    nvert = int(vert.sum(-1).max()) if vert.numel() else 0
    vcol = cols.sort(-1).values[..., :max(nvert, 1)].to(torch.int32).contiguous()
    last = torch.clamp(qt * block + block - 1, max=T - 1).expand(B, H, nt).contiguous()
    vcnt = torch.searchsorted(vcol, last, right=True).to(torch.int32)
    return dict(delta=dsort.contiguous(), dcnt=dcnt.contiguous(), vcol=vcol, vcnt=vcnt.contiguous(),
                bdiag=bdiag.to(torch.uint8).contiguous(), block=block)


def vertical_slash_work(plan: dict) -> float:
    """(query, key) pairs the kernel computes: visited tiles, and gathered chunks of columns."""
    bl = plan["block"]
    a = float(plan["dcnt"].sum()) * bl * bl
    chunks = torch.div(plan["vcnt"] + bl - 1, bl, rounding_mode="floor")
    return a + float(chunks.sum()) * bl * bl


def vertical_slash_attention(q, k, v, vert, slash, block: int = 64, plan=None, scale=None):
    """Causal attention over the pairs (q, k) with vert[k] or slash[q - k]; Tq == Tk."""
    q, k, v = _check(q, k, v)
    B, H, T, D = q.shape
    if k.shape[2] != T:
        raise ValueError("vertical_slash_attention: prefill only (Tq == Tk)")
    plan = vertical_slash_plan(vert, slash, block) if plan is None else plan
    vb, sbit = vert.to(torch.uint8).contiguous(), slash.to(torch.uint8).contiguous()
    out = torch.zeros_like(q)
    nt = math.ceil(T / block)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    d, vc, vn, g = plan["delta"], plan["vcol"], plan["vcnt"], plan["bdiag"]
    _vertical_slash_fwd[(nt, B * H)](
        q, k, v, out, vb, sbit, d, plan["dcnt"], vc, vn, g,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        vb.stride(0), vb.stride(1), d.stride(0), d.stride(1), d.stride(2),
        vc.stride(0), vc.stride(1), vn.stride(0), vn.stride(1), g.stride(0), g.stride(1),
        H, H // k.shape[1], T, nt, scale * LOG2E,
        BLOCK=block, D=D, num_warps=_num_warps(block, D), num_stages=3,
    )
    return out


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
        from methods.kernels.block_sparse_bwd import NSASelectedAttention

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


# ---- SparseK by query tiles: the tile's candidate keys in score order, then its window -----
if triton is not None:

    @triton.jit
    def _sparsek_cand_step(acc, m_i, l_i, q, kbase, vbase, skt, svt, offs_d, POS, VAL, j0, n, lim, tau, kth,
                           qk_scale, BLOCK_N: tl.constexpr):
        """Candidates j0 .. j0 + BLOCK_N - 1 of a list of n (key positions POS, scores VAL) for
        the tile's rows: row i attends key j with weight clip(u_j - tau_i, 0, 1) when j is among
        its top k (u_j >= kth_i, j <= lim_i)."""
        jj = j0 + tl.arange(0, BLOCK_N)
        live = jj < n
        kp = tl.load(POS + jj, mask=live, other=0)
        u = tl.load(VAL + jj, mask=live, other=float("-inf"))
        k = tl.load(kbase + kp[None, :] * skt + offs_d[:, None], mask=live[None, :], other=0.0)
        v = tl.load(vbase + kp[:, None] * svt + offs_d[None, :], mask=live[:, None], other=0.0)
        w = tl.minimum(tl.maximum(u[None, :] - tau[:, None], 0.0), 1.0)
        sel = live[None, :] & (kp[None, :] <= lim[:, None]) & (u[None, :] >= kth[:, None]) & (w > 0)
        s = tl.dot(q, k) * qk_scale + tl.log2(tl.where(sel, w, 1.0)).to(tl.float32)
        return _softmax_update(acc, m_i, l_i, s, 1.0, v, sel)

    @triton.jit
    def _sparsek_tile_fwd(
        Q, K, V, O, SV, ORD, START, NEWP, NEWV, TAU, KTH,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        H, REP, C, L, MP, NT, POS0, WIN, TK, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):
        """Rows of a query tile (key positions POS0 + row) of head h: the shared candidates in
        ascending score order from the tile's START (the first that some row's k-th best
        admits), the chunk's newer candidates NEWP/NEWV, then the window (pos - WIN, pos]."""
        qt = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        hk = h // REP
        bhk = b * (H // REP) + hk
        rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        rin = rows < C
        pos = POS0 + rows
        lim = pos - WIN
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], mask=rin[:, None], other=0.0)
        tau = tl.load(TAU + bhk * C + rows, mask=rin, other=0.0)
        kth = tl.load(KTH + bhk * C + rows, mask=rin, other=float("inf"))  # rows past the end: none
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        kbase, vbase = K + b * skb + hk * skh, V + b * svb + hk * svh
        for j0 in range(tl.load(START + bhk * NT + qt), L, BLOCK_N):  # the shared ones, from the tile's start
            acc, m_i, l_i = _sparsek_cand_step(acc, m_i, l_i, q, kbase, vbase, skt, svt, offs_d, ORD + bhk * L,
                                               SV + bhk * L, j0, L, lim, tau, kth, qk_scale, BLOCK_N)
        for j0 in range(0, MP, BLOCK_N):  # the chunk's newer ones
            acc, m_i, l_i = _sparsek_cand_step(acc, m_i, l_i, q, kbase, vbase, skt, svt, offs_d, NEWP + bhk * MP,
                                               NEWV + bhk * MP, j0, MP, lim, tau, kth, qk_scale, BLOCK_N)
        first = POS0 + qt * BLOCK_M
        for j0 in range(tl.maximum(first - WIN + 1, 0), tl.minimum(first + BLOCK_M, TK), BLOCK_N):
            kp = j0 + tl.arange(0, BLOCK_N)
            ok = rin[:, None] & (kp[None, :] <= pos[:, None]) & (kp[None, :] > lim[:, None]) & (kp < TK)[None, :]
            k = tl.load(kbase + kp[None, :] * skt + offs_d[:, None], mask=(kp < TK)[None, :], other=0.0)
            v = tl.load(vbase + kp[:, None] * svt + offs_d[None, :], mask=(kp < TK)[:, None], other=0.0)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, ok, qk_scale)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=rin[:, None])


def sparsek_tile_attention(q, k, v, plan: dict, pos0: int, window: int, scale=None, block_m: int = 64,
                           block_n: int = 64):
    """SparseK's attention by query tiles for rows at key positions pos0 .. pos0 + c - 1
    (``SparseK._soft_mask_rows_fast(..., plan=True)`` gives ``plan``): a tile reads its rows'
    candidates once, in score order, instead of each row gathering its own k keys. Row i
    attends key j with weight clip(u_j - tau_i, 0, 1) when u_j >= kth_i (its k-th best
    candidate score) and j <= pos_i - window, and its window with weight 1 (ties at the k-th
    best all enter; the gather path takes k of them). q [B, H, c, D]; k, v [B, Hkv, Tk, D]."""
    q, k, v = _check(q, k, v)
    B, H, c, D = q.shape
    Hkv = k.shape[1]
    sv, order, newp, newv, tau, kth = (plan[n] for n in ("sv", "order", "newp", "newv", "tau", "kth"))
    L, mp = sv.shape[-1], newp.shape[-1]
    nt = math.ceil(c / block_m)
    # each tile starts at the first shared candidate that its most permissive row (lowest kth) admits
    pad = torch.nn.functional.pad(kth, (0, nt * block_m - c), value=float("inf"))
    low = pad.view(B, Hkv, nt, block_m).amin(-1)
    start = (torch.searchsorted(sv.contiguous(), low.contiguous(), right=False) if L else torch.zeros_like(low))
    start = start.to(torch.int32)
    flat = lambda x, dt=None: (x.reshape(B * Hkv, -1) if x.numel() else x.new_zeros(B * Hkv, 1)).to(dt or x.dtype).contiguous()  # noqa: E731
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    _sparsek_tile_fwd[(nt, B * H)](
        q, k, v, out, flat(sv), flat(order, torch.int32), flat(start), flat(newp, torch.int32), flat(newv),
        flat(tau), flat(kth),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        H, H // Hkv, c, L, mp, nt, pos0, window, k.shape[2], scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, D=D, num_warps=4, num_stages=2,
    )
    return out


# ---- SparseK's threshold search: bisection per row, in one kernel ---------------------------
if triton is not None:

    @triton.jit
    def _count_sorted(base, x, lo, hi, RIGHT: tl.constexpr):
        """Entries of the ascending ``base`` that are <= x (RIGHT) or < x, per element of x, each
        known to lie in [lo, hi]: a binary search of as many steps as the widest bracket needs."""
        while tl.max(hi - lo, 0) > 0:
            mid = (lo + hi) // 2
            active = lo < hi
            val = tl.load(base + mid, mask=active, other=0.0)
            go = (val <= x) if RIGHT else (val < x)
            lo = tl.where(active & go, mid + 1, lo)
            hi = tl.where(active & ~go, mid, hi)
        return lo

    @triton.jit
    def _sparsek_bisect(SV, CS, NEW, NEWP, LIM, LO, HI, KK, L, M, C, ITERS,
                        R: tl.constexpr, TILE: tl.constexpr):
        """Rows of one (batch, KV head): bisection on tau of f(tau) = sum clip(u - tau, 0, 1)
        over the row's candidates = the shared ones (sorted SV, prefix sums CS: two counts by
        binary search) and the newer ones NEW at positions NEWP <= LIM[row]; (LO, HI) in, the
        final bracket out. The counts at the bracket's ends bound the counts at its middle, so
        each search narrows as the bracket does."""
        bh = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * R + tl.arange(0, R)
        live = rows < C
        lo = tl.load(LO + bh * C + rows, mask=live, other=0.0)
        hi = tl.load(HI + bh * C + rows, mask=live, other=0.0)
        kk = tl.load(KK + bh * C + rows, mask=live, other=0.0)
        lim = tl.load(LIM + rows, mask=live, other=-1)
        sv, cs, new, newp = SV + bh * L, CS + bh * (L + 1), NEW + bh * M, NEWP + bh * M
        a_lo = tl.zeros([R], tl.int32)  # entries <= lo (a lower bound), <= hi (an upper bound)
        a_hi = a_lo + L
        b_lo, b_hi = a_lo, a_hi  # the same for entries < lo + 1, < hi + 1
        for _ in range(ITERS):
            mid = (lo + hi) / 2
            a = _count_sorted(sv, mid, a_lo, a_hi, True)  # entries <= tau
            b = _count_sorted(sv, mid + 1, b_lo, b_hi, False)  # entries < tau + 1
            f = (L - b).to(mid.dtype) + (tl.load(cs + b) - tl.load(cs + a)) - mid * (b - a).to(mid.dtype)
            for j0 in range(0, M, TILE):
                j = j0 + tl.arange(0, TILE)
                x = tl.load(new + j, mask=j < M, other=0.0)
                p = tl.load(newp + j, mask=j < M, other=0)
                clip = tl.minimum(tl.maximum(x[None, :] - mid[:, None], 0.0), 1.0)
                f += tl.sum(tl.where((j < M)[None, :] & (p[None, :] <= lim[:, None]), clip, 0.0), 1)
            more = f > kk
            lo, hi = tl.where(more, mid, lo), tl.where(more, hi, mid)
            a_lo, a_hi = tl.where(more, a, a_lo), tl.where(more, a_hi, a)
            b_lo, b_hi = tl.where(more, b, b_lo), tl.where(more, b_hi, b)
        tl.store(LO + bh * C + rows, lo, mask=live)
        tl.store(HI + bh * C + rows, hi, mask=live)


def sparsek_bisect(sv, cs, new, newp, lim, lo, hi, kk, iters: int):
    """SparseK's threshold bisection for a chunk of rows (``SparseK._soft_mask_rows_fast``):
    sv [BH, L] the shared candidates sorted ascending, cs [BH, L + 1] their prefix sums;
    new, newp [BH, M] the newer candidates' scores and positions (row r has those at positions
    <= lim[r]; padded ones score -big); lo, hi, kk [BH, C] the brackets and targets. Returns the
    brackets after ``iters`` halvings."""
    BH, L = sv.shape
    C, M = lo.shape[-1], new.shape[-1]
    sv, cs, kk = sv.contiguous(), cs.contiguous(), kk.contiguous()
    new = new.contiguous() if M else sv.new_zeros(BH, 1)
    newp = newp.to(torch.int32).contiguous() if M else torch.zeros(BH, 1, dtype=torch.int32, device=sv.device)
    lo, hi = lo.contiguous().clone(), hi.contiguous().clone()
    R = 32
    _sparsek_bisect[(math.ceil(C / R), BH)](sv, cs, new, newp, lim.to(torch.int32).contiguous(), lo, hi, kk,
                                            L, M, C, iters, R=R, TILE=64, num_warps=4)
    return lo, hi


# ---- NSA's compressed branch -------------------------------------------------------------
if triton is not None:

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
        blocks they overlap, summed over the heads."""
        # the selection blocks this tile touches: s0 .. s0 + NS - 1
        offs_s = tl.arange(0, NS)
        s0 = (j0 * CS) // BS
        first = (offs_n * CS) // BS - s0
        final = (offs_n * CS + CL - 1) // BS - s0
        sel = offs_s[None, :] + s0
        hit = ((offs_s[None, :] >= first[:, None]) & (offs_s[None, :] <= final[:, None])).to(p.dtype)
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
        from methods.kernels.block_sparse_bwd import NSACompressedAttention

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
