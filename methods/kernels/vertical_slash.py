"""Vertical-slash attention in Triton (MInference's pattern), forward only.

vertical_slash_attention(q, k, v, vert, slash, block): q [B, H, T, D], k, v [B, Hkv, T, D];
vert, slash [B, H, T] bool (key columns; diagonals q - k). Causal; pair (q, k) is kept when
column k is a vertical or diagonal q - k a slash. ``vertical_slash_plan`` says what each query
tile visits: phase A the key tiles that slashes cross (with the element mask), phase B the
vertical columns outside them. No autograd Function: no backward (forward only).
Reference: ``methods.base.masked_attention`` with the vertical-slash mask.
"""
from __future__ import annotations

import math

import torch

from methods.kernels._common import LOG2E, _check, _num_warps, triton

if triton is not None:
    import triton.language as tl

    from methods.kernels._common import _online_softmax_step

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
