"""SparseK attention: a scoring network and a differentiable top-k mask over key-value pairs.

Lou et al., "Sparser is Faster and Less is More: Efficient Sparse Attention for Long-Range
Transformers" (2024), Sec. 3. Causal.

    u_j = w . k_j + b                                  scoring network on keys     [B, Hkv, T]
    SparseK(u, k) = argmin_{p in C} |p - u|^2,  C = {p : 0 <= p <= 1, sum p = k}
                  = clip(u - tau, 0, 1)  with tau found by a threshold search (bisection)
Query i attends to its local window (keys i - window < j <= i, weight 1) and to the k
best-scoring earlier keys j <= i - window, whose attention weights are multiplied by the
soft mask p_j = SparseK(u_{j <= i - window}, k)_j:
    o_i = sum_j m_ij exp(s_ij) v_j / sum_j m_ij exp(s_ij)
Gradients reach the scoring network through p (the operator's Jacobian on its free set).
With k and the window covering every key it is exact attention.

impl=reference  soft mask materialised [B, H, T, T]
impl=gather     per chunk of queries, the k selected keys are gathered and the window is a
                contiguous slab of keys: memory grows with k + window per query (and the
                chunk), not with the square of the length
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from methods import masks
from methods.base import AttentionMethod, Cost, repeat_kv


class SparseKOp(torch.autograd.Function):
    """p = clip(u - tau, 0, 1), sum p = k, over the entries where ``valid`` (rows of u)."""

    @staticmethod
    def forward(ctx, u, valid, k: float):
        dt = u.dtype
        iters = 64 if dt == torch.float64 else 30  # halves the bracket to below the dtype's precision
        u = u.masked_fill(~valid, 0.0)
        n = valid.sum(-1, keepdim=True).to(dt)  # visible count per row
        big = torch.finfo(dt).max / 4
        lo = torch.where(valid, u, torch.full_like(u, big)).amin(-1, keepdim=True) - 1.0  # sum = n
        hi = torch.where(valid, u, torch.full_like(u, -big)).amax(-1, keepdim=True)  # sum = 0
        kk = torch.minimum(torch.full_like(n, float(k)), n)
        for _ in range(iters):  # bisection on the monotone f(tau) = sum clip(u - tau, 0, 1)
            mid = (lo + hi) / 2
            f = ((u - mid).clamp(0, 1) * valid).sum(-1, keepdim=True)
            lo, hi = torch.where(f > kk, mid, lo), torch.where(f > kk, hi, mid)
        tau = (lo + hi) / 2
        full = n <= k  # every visible entry selected
        tau = torch.where(full, lo, tau)
        p = ((u - tau).clamp(0, 1) * valid).to(dt)
        ctx.save_for_backward(p, valid)
        return p

    @staticmethod
    def backward(ctx, g):
        p, valid = ctx.saved_tensors
        free = ((p > 0) & (p < 1) & valid).to(g.dtype)  # dp/du = I - 1 1^T / |S| on the free set S
        cnt = free.sum(-1, keepdim=True).clamp_min(1.0)
        gu = free * (g - (g * free).sum(-1, keepdim=True) / cnt)
        return gu, None, None, None


def sparsek(u, k: float, valid=None):
    valid = torch.ones_like(u, dtype=torch.bool) if valid is None else valid
    return SparseKOp.apply(u, valid, float(k))


class SparseK(AttentionMethod):
    name = "sparsek"
    supports_noncausal = False
    trainable = True
    training_free = False
    impls = ("reference", "gather")

    def __init__(self, k: int = 256, window: int = 256, query_chunk: int = 256, impl: str = "gather",
                 **structural):
        super().__init__(impl=impl, **structural)
        if k < 1 or window < 1:
            raise ValueError(f"SparseK: k and window must be >= 1, got k={k}, window={window}")
        self.k, self.window, self.query_chunk = k, window, query_chunk
        self.score = nn.Linear(self.head_dim, 1)  # the scoring network (shared by the KV heads)

    def hyperparameters(self) -> dict:
        return {"k": self.k, "window": self.window}

    def scores(self, k):
        return self.score(k.to(self.score.weight.dtype)).squeeze(-1)  # [B, Hkv, T]

    def _soft_mask_rows(self, u, rows, tk, kpm):
        """For query positions ``rows``: candidates j <= i - window (and not padding), their
        top-k, and the SparseK weights. Returns (idx [B,Hkv,c,k'], weight, valid)."""
        j = torch.arange(tk, device=u.device).view(1, tk)
        cand = (j <= rows.view(-1, 1) - self.window)  # [c, T]
        cand = cand.view(1, 1, *cand.shape)
        if kpm is not None:
            cand = cand & kpm[:, None, None, :]
        uu = u.unsqueeze(2).expand(-1, -1, len(rows), -1)  # [B, Hkv, c, T]
        p = sparsek(uu, self.k, cand)  # [B, Hkv, c, T]
        kk = min(self.k, max(1, tk - self.window))  # no more than there can be candidates
        top = uu.masked_fill(~cand, float("-inf")).topk(kk, dim=-1)
        ok = torch.isfinite(top.values)
        return top.indices, torch.gather(p, -1, top.indices) * ok, ok

    def attend(self, q, k, v, causal, key_padding_mask):
        B, H, tq, D = q.shape
        tk, rep = k.shape[2], H // k.shape[1]
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        u = self.scores(k).to(dt)
        off = tk - tq
        scale = 1.0 / math.sqrt(D)
        outs, counted = [], 0
        chunk = tq if self.impl == "reference" else self.query_chunk
        for a in range(0, tq, chunk):
            b = min(a + chunk, tq)
            rows = torch.arange(a, b, device=q.device) + off
            idx, wsel, ok = self._soft_mask_rows(u, rows, tk, key_padding_mask)  # [B, Hkv, c, k']
            qc = q[:, :, a:b].to(dt)
            if self.impl == "reference":
                m = torch.zeros(B, k.shape[1], b - a, tk, dtype=dt, device=q.device)
                m.scatter_(-1, idx, wsel)  # soft weights of the selected keys
                win = masks.materialize(masks.and_masks(masks.sliding_window(self.window, off + a),
                                                        masks.causal(off + a)), 1, 1, b - a, tk, q.device)[0, 0]
                if key_padding_mask is not None:
                    win = win & key_padding_mask[:, None, None, :]
                m = torch.maximum(repeat_kv(m, rep), win.to(dt).expand(B, H, -1, -1))
                s = qc @ repeat_kv(k, rep).to(dt).transpose(-1, -2) * scale  # [B, H, c, T]
                counted += int((m > 0).sum())
                outs.append(_weighted_softmax(s, m) @ repeat_kv(v, rep).to(dt))
            else:
                o, n = self._gather_chunk(qc, k, v, idx, wsel, rows, key_padding_mask, rep, dt, scale)
                outs.append(o)
                counted += n
        self.last_density = counted / float(B * H * masks.causal_pairs(tq, tk))
        return torch.cat(outs, 2).to(q.dtype)

    def _gather_chunk(self, qc, k, v, idx, wsel, rows, kpm, rep, dt, scale):
        """Selected keys are gathered ([c, k, D] per head); the window is the contiguous slab of
        keys (rows[0] - window, rows[-1]] shared by the chunk, masked to each query's band."""
        B, Hkv, c, kk = idx.shape
        D, w = k.shape[-1], self.window
        gi = idx.reshape(B, Hkv, c * kk, 1).expand(-1, -1, -1, D)
        ks = repeat_kv(torch.gather(k, 2, gi).to(dt).view(B, Hkv, c * kk, D), rep)  # [B, H, c*k, D]
        vs = repeat_kv(torch.gather(v, 2, gi).to(dt).view(B, Hkv, c * kk, D), rep)
        H = Hkv * rep
        s_sel = (qc.unsqueeze(-2) @ ks.view(B, H, c, kk, D).transpose(-1, -2)).squeeze(-2) * scale  # [B, H, c, k]
        lo, hi = max(0, int(rows[0]) - w + 1), int(rows[-1]) + 1
        kw, vw = repeat_kv(k[:, :, lo:hi].to(dt), rep), repeat_kv(v[:, :, lo:hi].to(dt), rep)  # slab
        pos = torch.arange(lo, hi, device=qc.device).view(1, -1)
        band = (pos <= rows.view(-1, 1)) & (pos > rows.view(-1, 1) - w)  # [c, slab]
        band = band.view(1, 1, c, -1)
        if kpm is not None:
            band = band & kpm[:, None, None, lo:hi]
        s_win = (qc @ kw.transpose(-1, -2)) * scale  # [B, H, c, slab]
        m = torch.cat([repeat_kv(wsel, rep), band.to(dt).expand(B, H, -1, -1)], -1)
        p = _weighted_softmax(torch.cat([s_sel, s_win], -1), m)
        out = (p[..., :kk].unsqueeze(-2) @ vs.view(B, H, c, kk, D)).squeeze(-2) + p[..., kk:] @ vw
        count = int((m > 0).sum())  # pairs really attended (selected with weight > 0, window)
        return out, count

    def cost(self, tq, tk, causal) -> Cost:
        off = tk - tq
        pairs = sum(min(self.window, i + off + 1) + min(self.k, max(0, i + off + 1 - self.window))
                    for i in range(tq))
        dense_pairs = masks.causal_pairs(tq, tk)
        flops = 4.0 * self.num_heads * self.head_dim * pairs + 2.0 * self.num_kv_heads * tk * self.head_dim
        return Cost(flops=flops, density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)


def _weighted_softmax(s, m):
    """softmax with multiplicative weights m >= 0: m exp(s) / sum m exp(s); rows of m = 0 give 0."""
    s = s.masked_fill(m <= 0, float("-inf"))
    mx = s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    e = torch.exp(s - mx) * m
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)
