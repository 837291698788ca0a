"""Block-sparse attention in Triton, forward and backward, with its window layouts and tile lists.

block_sparse_attention(q, k, v, idx, cnt, ...): q [B, H, Tq, D], k, v [B, Hkv, Tk, D]; query tile
i visits the key tiles ``idx[b, h, i, :cnt[b, h, i]]`` (int32, from ``layout_to_lists`` of a
[.., nq, nk] bool layout, or ``window_lists``); inside a visited tile, keys are kept when causal
(end-aligned), within a window (``-win_r < q - k < win_l``) or a sink (``k < sink``), and not
padded. FlashAttention-style forward (online softmax in fp32, exp2). Serves sliding window,
BigBird, MInference A-shape and block-sparse, and NSA's window branch.
Backward: ``BlockSparseAttention`` (autograd Function, used when gradients are enabled): dQ by
query tile over the key tiles it visited, dK and dV by key tile over the query tiles that
visited it (``transpose_lists``); with grouped-query attention per query head, summed.
Reference: ``methods.base.masked_attention`` with the matching mask (tests/test_kernels.py).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from methods.kernels._common import (  # noqa: F401 - usable re-exported
    LOG2E,
    _check,
    _delta,
    _num_warps,
    _tile,
    read_entries,
    triton,
    usable,
)

BIG = 2**30  # "no window"


if triton is not None:
    import triton.language as tl

    from methods.kernels._common import _dq_step, _online_softmax_step, _row_inputs

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


# ---- launch settings: the tile table -------------------------------------------------------
TILES_FILE = Path(__file__).with_name("tiles.json")  # written by scripts/tune_block_sparse.py --table
DEFAULT_TILES = {"block_m": 64, "block_n": 64, "num_warps": None, "num_stages": 3}
SPARSE_BELOW = 0.25  # a window under this fraction of the length is a sparse case (else dense)


@functools.lru_cache(maxsize=4)
def tile_table(path: str | None = None) -> tuple[dict, ...]:
    """The entries of the tile table (``TILES_FILE``; empty where there is none)."""
    return read_entries(Path(path) if path else TILES_FILE)


def tiles_for(head_dim: int, seq_len: int, dtype, causal: bool, window: int | None = None,
              grad: bool = False, path: str | None = None) -> dict:
    """Launch settings of a window pattern whose tiles are free (sliding window, A-shape, NSA's
    window): {block_m, block_n, num_warps, num_stages, source}. The table entry of this head
    dim, dtype (``str(dtype)`` without ``torch.``), causality and case (``dense``: no window or
    one of at least ``SPARSE_BELOW`` of the length; else ``window``) at the largest length
    bucket at or below ``seq_len`` (the smallest bucket where all are above); the defaults
    (``DEFAULT_TILES``) where the table has no such entry, and under autograd (the backward
    kernels are tuned at the default tiles)."""
    case = "dense" if window is None or window >= SPARSE_BELOW * seq_len else "window"
    if grad:
        return {**DEFAULT_TILES, "source": "default (backward)"}
    dt = str(dtype).replace("torch.", "")
    rows = [e for e in tile_table(path) if (e["head_dim"], e["dtype"], bool(e["causal"]), e["case"]) ==
            (head_dim, dt, bool(causal), case)]
    if not rows:
        return {**DEFAULT_TILES, "source": "default"}
    below = [e for e in rows if e["seq_len"] <= seq_len]
    e = max(below, key=lambda e: e["seq_len"]) if below else min(rows, key=lambda e: e["seq_len"])
    return {**{k: e[k] for k in DEFAULT_TILES},
            "source": f"tiles.json: {e.get('gpu')}, D={head_dim} {dt} causal={bool(causal)} {case} T={e['seq_len']}"}


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
