"""SparseK in Triton (Lou et al. 2024): attention by query tiles and the threshold bisection.

sparsek_tile_attention(q, k, v, plan, pos0, window): each query tile attends its candidate keys
(in score order, kept above the row's threshold, weighted by the mask value) and its local
window; q [B, H, c, D], k, v [B, Hkv, T, D]. sparsek_select: per row of a chunk, the k-th best
candidate score, the threshold whose clipped mask sums to k (bisection) and the pairs attended,
in one kernel (the tile attention's inputs). sparsek_bisect: the threshold alone (the gather
path's forward selection). sparsek_tile_backward: the tile attention's gradients (dQ; dK, dV
and the scores' gradient through the weights by atomic adds); methods.sparsek._SparseKKernel
is the autograd Function around both.
"""
from __future__ import annotations

import math

import torch

from methods.kernels._common import LOG2E, _check, triton, usable  # noqa: F401 - usable re-exported

TILE_ROWS = TILE_KEYS = 64  # the tile attention's query rows and key columns per step (forward and backward)
SELECT_ROWS = 32  # rows per program of the selection kernel


def select_iters(dtype) -> int:
    """Halvings of tau's bracket [kth - 1, kth): to below the dtype's resolution at scores of order 1."""
    return 50 if dtype == torch.float64 else 24


if triton is not None:
    import triton.language as tl

    from methods.kernels._common import _online_softmax_step, _softmax_update

# ---- SparseK by query tiles: the tile's candidate keys in score order, then its window -----
if triton is not None:

    @triton.jit
    def _tile_rows(H, REP, C, POS0, WIN, BLOCK_M: tl.constexpr):
        """This program's query tile (axis 0) and (batch, query head) (axis 1): its KV head, the
        rows, which are real, their key positions and their last candidate (position - WIN)."""
        qt = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        hk = h // REP
        rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        pos = POS0 + rows
        return qt, bh, b, h, hk, b * (H // REP) + hk, rows, rows < C, pos, pos - WIN

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
        Q, K, V, O, LSE, SV, ORD, START, NEWP, NEWV, NNEW, TAU, KTH,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        H, REP, C, L, MP, NT, POS0, WIN, TK, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, STORE_LSE: tl.constexpr,
    ):
        """Rows of a query tile (key positions POS0 + row) of head h: the shared candidates in
        ascending score order from the tile's START (the first that some row's k-th best
        admits), the chunk's newer candidates NEWP/NEWV, then the window (pos - WIN, pos]."""
        qt, bh, b, h, hk, bhk, rows, rin, pos, lim = _tile_rows(H, REP, C, POS0, WIN, BLOCK_M)
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
        n_new = tl.load(NNEW + bhk)  # this head's newer candidates (the first of its row of MP)
        for j0 in range(0, n_new, BLOCK_N):  # the chunk's newer ones
            acc, m_i, l_i = _sparsek_cand_step(acc, m_i, l_i, q, kbase, vbase, skt, svt, offs_d, NEWP + bhk * MP,
                                               NEWV + bhk * MP, j0, n_new, lim, tau, kth, qk_scale, BLOCK_N)
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
        if STORE_LSE:  # base 2: m + log2(l), for the backward
            tl.store(LSE + bh * C + rows, m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)), mask=rin)


def _tile_inputs(q, plan: dict, block_m: int):
    """The plan's tensors flattened per (batch, KV head), each tile's first shared candidate
    (the first its most permissive row, lowest kth, admits) and the newer candidates' counts."""
    B, H, c, D = q.shape
    sv, order, newp, newv, tau, kth = (plan[n] for n in ("sv", "order", "newp", "newv", "tau", "kth"))
    Hkv = sv.shape[1]
    L, mp = sv.shape[-1], newp.shape[-1]
    n_new = plan.get("n_new")  # [B, Hkv] newer candidates per head (the first of each row); None: all
    n_new = torch.full((B * Hkv,), mp, dtype=torch.int32, device=q.device) if n_new is None else \
        n_new.reshape(B * Hkv).to(torch.int32).contiguous()
    nt = math.ceil(c / block_m)
    pad = torch.nn.functional.pad(kth, (0, nt * block_m - c), value=float("inf"))
    low = pad.view(B, Hkv, nt, block_m).amin(-1)
    start = (torch.searchsorted(sv.contiguous(), low.contiguous(), right=False) if L else torch.zeros_like(low))
    flat = lambda x, dt=None: (x.reshape(B * Hkv, -1) if x.numel() else x.new_zeros(B * Hkv, 1)).to(dt or x.dtype).contiguous()  # noqa: E731
    return (flat(sv), flat(order, torch.int32), flat(start, torch.int32), flat(newp, torch.int32), flat(newv), n_new,
            flat(tau), flat(kth)), (L, mp, nt)


def sparsek_tile_attention(q, k, v, plan: dict, pos0: int, window: int, scale=None, block_m: int = TILE_ROWS,
                           block_n: int = TILE_KEYS, lse: torch.Tensor | None = None):
    """SparseK's attention by query tiles for rows at key positions pos0 .. pos0 + c - 1
    (``SparseK._kernel_plan`` gives ``plan``): a tile reads its rows'
    candidates once, in score order, instead of each row gathering its own k keys. Row i
    attends key j with weight clip(u_j - tau_i, 0, 1) when u_j >= kth_i (its k-th best
    candidate score) and j <= pos_i - window, and its window with weight 1 (ties at the k-th
    best all enter; the gather path takes k of them). q [B, H, c, D]; k, v [B, Hkv, Tk, D].
    ``lse`` [B, H, c] fp32: filled with each row's log2-sum-exp2 of its weighted scores (the
    backward's, ``sparsek_tile_backward``)."""
    q, k, v = _check(q, k, v)
    B, H, c, D = q.shape
    ins, (L, mp, nt) = _tile_inputs(q, plan, block_m)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    _sparsek_tile_fwd[(nt, B * H)](
        q, k, v, out, out if lse is None else lse, *ins,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        H, H // k.shape[1], c, L, mp, nt, pos0, window, k.shape[2], scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, D=D, STORE_LSE=lse is not None, num_warps=4, num_stages=2,
    )
    return out


# ---- The backward of the tile attention: dQ per tile, dK, dV and dU (scores) by atomic adds ----
if triton is not None:

    @triton.jit
    def _cand_block(POS, VAL, j0, n, rin, lim, kth, BLOCK_N: tl.constexpr):
        """Candidates j0 .. j0 + BLOCK_N - 1 of a list of n (positions POS, scores VAL): their
        positions, scores, which exist, and which of the tile's rows select them (j <= the row's
        limit, u_j >= its k-th best)."""
        jj = j0 + tl.arange(0, BLOCK_N)
        live = jj < n
        kp = tl.load(POS + jj, mask=live, other=0)
        u = tl.load(VAL + jj, mask=live, other=float("-inf"))
        return kp, u, live, rin[:, None] & live[None, :] & (kp[None, :] <= lim[:, None]) & (u[None, :] >= kth[:, None])

    @triton.jit
    def _sparsek_bwd_block(dq, a_row, q, do, lse, delta, kbase, vbase, dkbase, dvbase, dubase, skt, svt, D,
                           offs_d, kp, live, ok, u, tau, qk_scale, sm_scale, CAND: tl.constexpr):
        """One block of keys at positions kp (``live``) for the tile's rows, under ``ok``:
        probabilities recomputed from the forward's LSE (base 2), then dS = P (dP - delta);
        dQ += dS K scale; dK += dS^T Q scale and dV += P^T dO (atomic: other tiles add to the
        same keys). CAND: the keys are candidates weighted w = clip(u - tau, 0, 1): the score's
        gradient through w, dS / w on the free pairs (0 < w < 1), is added to the row's sum
        (a_row) and to the key's score gradient (dU, atomic)."""
        k = tl.load(kbase + kp[None, :] * skt + offs_d[:, None], mask=live[None, :], other=0.0)  # [D, N]
        v = tl.load(vbase + kp[:, None] * svt + offs_d[None, :], mask=live[:, None], other=0.0)  # [N, D]
        t = tl.dot(q, k) * qk_scale
        if CAND:
            w = tl.minimum(tl.maximum(u[None, :] - tau[:, None], 0.0), 1.0)
            ok = ok & (w > 0)
            t += tl.log2(tl.where(ok, w, 1.0)).to(tl.float32)
        p = tl.where(ok, tl.exp2(t - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)).to(tl.float32) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), tl.trans(k)).to(tl.float32) * sm_scale
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q).to(tl.float32) * sm_scale
        dv = tl.dot(tl.trans(p.to(do.dtype)), do).to(tl.float32)
        tl.atomic_add(dkbase + kp[:, None] * D + offs_d[None, :], dk, mask=live[:, None])
        tl.atomic_add(dvbase + kp[:, None] * D + offs_d[None, :], dv, mask=live[:, None])
        if CAND:
            g = tl.where(ok & (w < 1.0), ds / tl.where(ok, w, 1.0), 0.0)
            a_row += tl.sum(g, 1)
            tl.atomic_add(dubase + kp, tl.sum(g, 0), mask=live)
        return dq, a_row

    @triton.jit
    def _sparsek_tile_bwd(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV, DU, AROW, SV, ORD, START, NEWP, NEWV, NNEW, TAU, KTH,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
        H, REP, C, L, MP, NT, POS0, WIN, TK, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):
        """The forward's walk (``_sparsek_tile_fwd``) again for the gradients: DQ, DO [B, H, C, D]
        and LSE, DELTA (rowsum dO * O), AROW [B, H, C] (fp32, per query head); DK, DV [B, Hkv, TK,
        D] and DU [B, Hkv, TK] fp32, added to."""
        qt, bh, b, h, hk, bhk, rows, rin, pos, lim = _tile_rows(H, REP, C, POS0, WIN, BLOCK_M)
        offs_d = tl.arange(0, D)
        qoff = b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :]
        q = tl.load(Q + qoff, mask=rin[:, None], other=0.0)
        do = tl.load(DO + bh * C * D + rows[:, None] * D + offs_d[None, :], mask=rin[:, None], other=0.0)
        lse = tl.load(LSE + bh * C + rows, mask=rin, other=float("inf"))
        delta = tl.load(DELTA + bh * C + rows, mask=rin, other=0.0)
        tau = tl.load(TAU + bhk * C + rows, mask=rin, other=0.0)
        kth = tl.load(KTH + bhk * C + rows, mask=rin, other=float("inf"))
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        a_row = tl.zeros([BLOCK_M], tl.float32)
        kbase, vbase = K + b * skb + hk * skh, V + b * svb + hk * svh
        dkbase, dvbase, dubase = DK + bhk * TK * D, DV + bhk * TK * D, DU + bhk * TK
        for j0 in range(tl.load(START + bhk * NT + qt), L, BLOCK_N):  # the shared candidates
            kp, u, live, ok = _cand_block(ORD + bhk * L, SV + bhk * L, j0, L, rin, lim, kth, BLOCK_N)
            dq, a_row = _sparsek_bwd_block(dq, a_row, q, do, lse, delta, kbase, vbase, dkbase, dvbase, dubase, skt,
                                           svt, D, offs_d, kp, live, ok, u, tau, qk_scale, sm_scale, True)
        n_new = tl.load(NNEW + bhk)
        for j0 in range(0, n_new, BLOCK_N):  # the chunk's newer candidates
            kp, u, live, ok = _cand_block(NEWP + bhk * MP, NEWV + bhk * MP, j0, n_new, rin, lim, kth, BLOCK_N)
            dq, a_row = _sparsek_bwd_block(dq, a_row, q, do, lse, delta, kbase, vbase, dkbase, dvbase, dubase, skt,
                                           svt, D, offs_d, kp, live, ok, u, tau, qk_scale, sm_scale, True)
        first = POS0 + qt * BLOCK_M
        for j0 in range(tl.maximum(first - WIN + 1, 0), tl.minimum(first + BLOCK_M, TK), BLOCK_N):  # the window
            kp = j0 + tl.arange(0, BLOCK_N)
            live = kp < TK
            ok = rin[:, None] & (kp[None, :] <= pos[:, None]) & (kp[None, :] > lim[:, None]) & live[None, :]
            dq, a_row = _sparsek_bwd_block(dq, a_row, q, do, lse, delta, kbase, vbase, dkbase, dvbase, dubase, skt,
                                           svt, D, offs_d, kp, live, ok, lse, tau, qk_scale, sm_scale, False)
        tl.store(DQ + bh * C * D + rows[:, None] * D + offs_d[None, :], dq, mask=rin[:, None])
        tl.store(AROW + bh * C + rows, a_row, mask=rin)


def sparsek_tile_backward(q, k, v, do, lse, delta, plan: dict, pos0: int, window: int, dk, dv, du, scale=None,
                          block_m: int = TILE_ROWS, block_n: int = TILE_KEYS):
    """The gradients of ``sparsek_tile_attention`` for one chunk of query rows: returns (dq [B, H,
    c, D] fp32, a_row [B, H, c] fp32: each row's sum over its free selected pairs of dL/dw_ij,
    the weight's gradient) and adds into dk, dv [B, Hkv, Tk, D] and du [B, Hkv, Tk] (fp32,
    contiguous) the keys' gradients and the scores' gradient through the weights. ``lse`` the
    forward's (base 2), ``delta`` rowsum(dO * O) [B, H, c] fp32."""
    q, k, v = _check(q, k, v)
    B, H, c, D = q.shape
    ins, (L, mp, nt) = _tile_inputs(q, plan, block_m)
    dq = torch.empty(B, H, c, D, device=q.device, dtype=torch.float32)
    a_row = torch.empty(B, H, c, device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    _sparsek_tile_bwd[(nt, B * H)](
        q, k, v, do.to(q.dtype).contiguous(), lse.contiguous(), delta.contiguous(), dq, dk, dv, du, a_row, *ins,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        H, H // k.shape[1], c, L, mp, nt, pos0, window, k.shape[2], scale * LOG2E, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, D=D, num_warps=4, num_stages=1,
    )
    return dq, a_row


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
    def _newer(new, newp, j0, M, lim, TILE: tl.constexpr):
        """Newer candidates j0 .. j0 + TILE - 1 of M (scores, -inf past M) and which of them each
        row sees (position <= its limit lim [R]): (x [TILE], vis [R, TILE])."""
        j = j0 + tl.arange(0, TILE)
        x = tl.load(new + j, mask=j < M, other=float("-inf"))
        p = tl.load(newp + j, mask=j < M, other=0)
        return x, (j < M)[None, :] & (p[None, :] <= lim[:, None])

    @triton.jit
    def _f_counts(sv, cs, new, newp, lim, t, a_lo, a_hi, b_lo, b_hi, L, M, TILE: tl.constexpr):
        """f(t) = sum clip(u - t, 0, 1) over a row's candidates, with the counts it rests on: the
        shared entries <= t (a) and < t + 1 (b), each searched in its bracket [lo, hi] (sorted sv,
        prefix sums cs), and the seen newer entries <= t (na) and < t + 1 (nb)."""
        a = _count_sorted(sv, t, a_lo, a_hi, True)
        b = _count_sorted(sv, t + 1, b_lo, b_hi, False)
        f = (L - b).to(t.dtype) + (tl.load(cs + b) - tl.load(cs + a)) - t * (b - a).to(t.dtype)
        na, nb = a * 0, a * 0
        for j0 in range(0, M, TILE):
            x, vis = _newer(new, newp, j0, M, lim, TILE)
            f += tl.sum(tl.where(vis, tl.minimum(tl.maximum(x[None, :] - t[:, None], 0.0), 1.0), 0.0), 1)
            na += tl.sum((vis & (x[None, :] <= t[:, None])).to(tl.int32), 1)
            nb += tl.sum((vis & (x[None, :] < t[:, None] + 1.0)).to(tl.int32), 1)
        return f, a, b, na, nb

    @triton.jit
    def _bisect_tau(sv, cs, new, newp, lim, lo, hi, kk, L, M, ITERS, R: tl.constexpr, TILE: tl.constexpr):
        """tau of f(tau) = sum clip(u - tau, 0, 1) = kk over each row's candidates (the shared
        ones: sorted sv, prefix sums cs; the newer ones it sees), f decreasing, in the bracket
        (lo, hi) (f(lo) > kk >= f(hi)). f is piecewise linear with breakpoints at the scores u
        and u - 1: halve each row's bracket until none lies inside it (the counts of entries
        <= t and < t + 1 are the same at both ends), then the root of that linear piece is
        exact: lo + (f(lo) - kk) / (f(lo) - f(hi)) (hi - lo), returned as lo = hi (so is an end
        where f = kk). At most ITERS halvings (rows with a breakpoint still inside return their
        bracket); the counts at the bracket's ends bound those at its middle, so each search
        narrows as the bracket does."""
        zero = tl.zeros([R], tl.int32)
        f_lo, a_lo, b_lo, na_lo, nb_lo = _f_counts(sv, cs, new, newp, lim, lo, zero, zero + L, zero, zero + L, L,
                                                   M, TILE)
        f_hi, a_hi, b_hi, na_hi, nb_hi = _f_counts(sv, cs, new, newp, lim, hi, a_lo, zero + L, b_lo, zero + L, L,
                                                   M, TILE)
        inside = (a_lo != a_hi) | (b_lo != b_hi) | (na_lo != na_hi) | (nb_lo != nb_hi)  # a breakpoint
        it = tl.full([], 0, tl.int32)  # a tensor: a loop-carried Python int would change type
        while (tl.max(inside.to(tl.int32), 0) > 0) & (it < ITERS):
            mid = (lo + hi) / 2
            f, a, b, na, nb = _f_counts(sv, cs, new, newp, lim, mid, a_lo, a_hi, b_lo, b_hi, L, M, TILE)
            more = f > kk  # the root is above mid
            lo, hi = tl.where(more, mid, lo), tl.where(more, hi, mid)
            f_lo, f_hi = tl.where(more, f, f_lo), tl.where(more, f_hi, f)
            a_lo, a_hi = tl.where(more, a, a_lo), tl.where(more, a_hi, a)
            b_lo, b_hi = tl.where(more, b, b_lo), tl.where(more, b_hi, b)
            na_lo, na_hi = tl.where(more, na, na_lo), tl.where(more, na_hi, na)
            nb_lo, nb_hi = tl.where(more, nb, nb_lo), tl.where(more, nb_hi, nb)
            inside = (a_lo != a_hi) | (b_lo != b_hi) | (na_lo != na_hi) | (nb_lo != nb_hi)
            it += 1
        linear = ~inside & (f_lo > f_hi)
        t = lo + (f_lo - kk) / tl.where(linear, f_lo - f_hi, 1.0) * (hi - lo)
        t = tl.minimum(tl.maximum(t, lo), hi)
        # an end where f is kk is a root (the breakpoint under the root of a row whose k-th best
        # weighs exactly 1 at tau = kth - 1 never leaves the bracket)
        t = tl.where(f_hi == kk, hi, tl.where(f_lo == kk, lo, t))
        exact = linear | (f_hi == kk) | (f_lo == kk)
        return tl.where(exact, t, lo), tl.where(exact, t, hi)

    @triton.jit
    def _sparsek_bisect(SV, CS, NEW, NEWP, LIM, LO, HI, KK, L, M, C, ITERS,
                        R: tl.constexpr, TILE: tl.constexpr):
        """Rows of one (batch, KV head): bisection on tau (``_bisect_tau``) over the row's
        candidates = the shared ones (SV, CS) and the newer ones NEW at positions NEWP <=
        LIM[row]; (LO, HI) in, the final bracket out."""
        bh = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * R + tl.arange(0, R)
        live = rows < C
        lo = tl.load(LO + bh * C + rows, mask=live, other=0.0)
        hi = tl.load(HI + bh * C + rows, mask=live, other=0.0)
        kk = tl.load(KK + bh * C + rows, mask=live, other=0.0)
        lim = tl.load(LIM + rows, mask=live, other=-1)
        sv, cs, new, newp = SV + bh * L, CS + bh * (L + 1), NEW + bh * M, NEWP + bh * M
        lo, hi = _bisect_tau(sv, cs, new, newp, lim, lo, hi, kk, L, M, ITERS, R, TILE)
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


# ---- The kernel path's whole selection for a chunk of rows: k-th best, tau, pairs ------------
if triton is not None:

    @triton.jit
    def _sparsek_select(SV, CS, NEW, NEWP, NNEW, KTH, TAU, PAIRS, NFREE, L, MS, C, FIRST, WIN, K, ITERS,
                        R: tl.constexpr, TILE: tl.constexpr):
        """Rows FIRST + r (r < C) of one (batch, KV head). A row's candidates are the keys
        j <= row - WIN: the chunk's shared ones (every j < the chunk's first row - WIN + 1:
        sorted ascending in SV, prefix sums CS) and the newer ones it sees (NEW, NEWP: the
        chunk's newer keys in descending score order, those that can be in a top-k or hold a
        weight; row r sees those at positions <= its limit). Out: the row's k-th best score
        (KTH; -big with fewer than K candidates), tau with sum_j clip(u_j - tau, 0, 1) = K
        (TAU; -big where every candidate is selected with weight 1) and the count of keys it
        attends (PAIRS: candidates >= KTH); NFREE: the candidates with weight in (0, 1) (the free
        set of the operator's Jacobian: tau < u < tau + 1)."""
        bh = tl.program_id(1).to(tl.int64)
        r = tl.program_id(0) * R + tl.arange(0, R)
        live = r < C
        lim = FIRST + r - WIN  # the last candidate
        n = tl.maximum(lim + 1, 0)  # candidates
        sv, cs, new, newp = SV + bh * L, CS + bh * (L + 1), NEW + bh * MS, NEWP + bh * MS
        M = tl.load(NNEW + bh)  # this head's newer candidates: the first M of its row of MS
        big = 1.0e30
        # k-th best of shared + seen newer: if t of the best K are newer (the t-th seen newer x_t),
        # it is min(the shared (K - t)-th best, x_t); the largest of these over t
        at0 = L - K + 0 * r  # [R]: the shared K-th best's index (negative: fewer than K shared)
        kth = tl.load(sv + tl.maximum(at0, 0), mask=live & (at0 >= 0), other=-big)
        seen = tl.zeros([R], tl.int32)
        for j0 in range(0, M, TILE):
            x, vis = _newer(new, newp, j0, M, lim, TILE)
            t = seen[:, None] + tl.cumsum(vis.to(tl.int32), axis=1)  # 1-based rank among the seen
            at = at0[:, None] + t
            a = tl.load(sv + tl.maximum(at, 0), mask=vis & (t < K) & (at >= 0) & live[:, None], other=-big)
            a = tl.where(t >= K, big, a)
            kth = tl.maximum(kth, tl.max(tl.where(vis & (t <= K), tl.minimum(a, x[None, :]), -big), 1))
            seen += tl.sum(vis.to(tl.int32), 1)
        full = n <= K
        kth = tl.where(full, -big, kth)
        # tau in [kth - 1, kth): f(kth - 1) >= K (the best K give 1 each), f(kth) < K
        lo, hi = _bisect_tau(sv, cs, new, newp, lim, kth - 1.0, kth, K * 1.0, L, M, ITERS, R, TILE)
        tau = tl.where(full, -big, (lo + hi) / 2)
        # pairs: candidates >= kth (kth > tau: each has a weight)
        ge = L - _count_sorted(sv, kth, tl.zeros([R], tl.int32), tl.zeros([R], tl.int32) + L, False)
        for j0 in range(0, M, TILE):
            x, vis = _newer(new, newp, j0, M, lim, TILE)
            ge += tl.sum((vis & (x[None, :] >= kth[:, None])).to(tl.int32), 1)
        pairs = tl.where(full, n, ge)
        zero = tl.zeros([R], tl.int32)
        free = _count_sorted(sv, tau + 1, zero, zero + L, False) - _count_sorted(sv, tau, zero, zero + L, True)
        for j0 in range(0, M, TILE):
            x, vis = _newer(new, newp, j0, M, lim, TILE)
            free += tl.sum((vis & (x[None, :] > tau[:, None]) & (x[None, :] < tau[:, None] + 1.0)).to(tl.int32), 1)
        tl.store(NFREE + bh * C + r, tl.where(full, 0, free), mask=live)
        tl.store(KTH + bh * C + r, kth, mask=live)
        tl.store(TAU + bh * C + r, tau, mask=live)
        tl.store(PAIRS + bh * C + r, pairs, mask=live)


def sparsek_select(sv, cs, new, newp, first: int, rows: int, window: int, k: int, iters: int | None = None,
                   n_new=None):
    """The kernel path's selection for ``rows`` query rows at key positions first .. first +
    rows - 1 (``SparseK._kernel_plan``): sv [BH, L] the shared candidates sorted ascending, cs
    [BH, L + 1] their prefix sums; new, newp [BH, M] newer candidates in descending score
    order with their positions (only those that can be in a top-k or weigh: the rest may be left
    out). ``n_new`` [BH]: how many of each row of ``new`` count (the rest are padding; None: all),
    read by the kernel, not the host. Returns (kth, tau, pairs, nfree), each [BH, rows]. ``iters``
    halvings of tau's bracket [kth - 1, kth) (None: ``select_iters``)."""
    BH, L = sv.shape
    M = new.shape[-1]
    iters = select_iters(sv.dtype) if iters is None else iters
    sv, cs = sv.contiguous(), cs.to(sv.dtype).contiguous()
    if not L:  # the kernel indexes the shared arrays: one unread slot
        sv, cs = sv.new_zeros(BH, 1), cs.new_zeros(BH, 2)
    new = new.to(sv.dtype).contiguous() if M else sv.new_zeros(BH, 1)
    newp = newp.to(torch.int32).contiguous() if M else torch.zeros(BH, 1, dtype=torch.int32, device=sv.device)
    kth = torch.empty(BH, rows, dtype=sv.dtype, device=sv.device)
    tau, pairs = torch.empty_like(kth), torch.empty(BH, rows, dtype=torch.int32, device=sv.device)
    nfree = torch.empty_like(pairs)
    n_new = torch.full((BH,), M, dtype=torch.int32, device=sv.device) if n_new is None else \
        n_new.reshape(BH).to(torch.int32).contiguous()
    R = SELECT_ROWS
    _sparsek_select[(math.ceil(rows / R), BH)](sv, cs, new, newp, n_new, kth, tau, pairs, nfree, L, max(M, 1), rows,
                                               first, window, k, iters, R=R, TILE=64, num_warps=4)
    return kth, tau, pairs, nfree
