"""SparseK attention: a scoring network and a differentiable top-k mask over key-value pairs.

Lou et al., "Sparser is Faster and Less is More: Efficient Sparse Attention for Long-Range
Transformers" (2024, arXiv 2406.16747), Sec. 3. Causal. The paper's text and the official code
were not reachable from this workplace, so the parts below are named by what they are, not by
equation number; each says which reading was chosen.

    (1) scoring network          u_j = w . k_j + b + position_slope * j        [B, Hkv, T]
    (2) SparseK operator         SparseK(u, k) = argmin_{p in C} |p - u|^2,
                                 C = {p : 0 <= p <= 1, sum p = k}
                                 = clip(u - tau, 0, 1), tau by a threshold search (bisection)
    (3) mask                     m_ij = 1 in the window i - window < j <= i; for the k
                                 best-scoring earlier keys j <= i - window, m_ij = p_j with
                                 p = SparseK(u_{j <= i - window}, k); 0 elsewhere
    (4) masked attention         o_i = sum_j m_ij exp(s_ij) v_j / sum_j m_ij exp(s_ij),
                                 s_ij = q_i . k_j / sqrt(D)  (= softmax(s_i + log m_i) v)

Readings chosen:
(1) The paper scores the layer input, u = X w_score plus a position-dependent term (a slope
    linear in the index, so that the scorer need not predict ever larger scores as the
    non-decreasing threshold tau rises along the sequence). Here the score is taken from the
    key k_j (a method sees q, k, v, not X; k_j is a linear image of x_j) and the position term
    is ``position_slope * j``, j the key's 0-based absolute position. Its value and whether
    it is learned are unknown here (neither the paper's value nor the official code could be
    read): it is a fixed hyperparameter, default 0.0 (the term off, the former behaviour),
    until the paper's or the official code's value is confirmed; a positive slope ranks
    newer keys higher.
(3) The mask multiplies the unnormalised attention weights (m_ij exp(s_ij)), as (4) writes
    it, not the normalised probabilities; the window's keys have weight 1.
Gradients reach the scoring network through p (the operator's Jacobian on its free set).
With k and the window covering every key it is exact attention.

impl=reference  soft mask materialised [B, H, T, T]
impl=triton     per chunk of queries, the selection in one Triton kernel (each row's k-th best
                score, tau and pairs: ``methods.kernels.sparsek.sparsek_select``, from the
                shared candidates sorted once per call and the chunk's newer ones), then one
                Triton kernel (``methods.kernels.sparsek.sparsek_tile_attention``) per
                tile of 64 queries: the candidates any of its rows can select, read once in
                score order and masked per row by its k-th best score, then its window
                (unpadded batches; else the gather path). With gradients the same walk
                runs backward (``sparsek_tile_backward``, ``_SparseKKernel``: dQ per tile,
                dK, dV and the scores' gradient added per key, the operator's mean term by
                prefix sums over the rows, whose tau never decreases)
impl=gather     per chunk of queries, the k selected keys are gathered and the window is a
                contiguous slab of keys: memory grows with k + window per query (and the
                chunk), not with the square of the length. Without gradients the threshold
                search sorts the chunk's shared candidates once and bisects with binary
                searches (no pass over [chunk, T] per step); with gradients it runs the
                operator on full rows (its backward needs each row's free set), and each
                chunk is recomputed in the backward (checkpointed): training memory holds
                one chunk's selection, not every chunk's
The scorer (u over the keys) is timed into ``last_index_ms`` under
``methods.base.index_timing(True)``; the threshold search runs per chunk with the attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from methods import masks
from methods.base import AttentionMethod, Cost, check_int, repeat_kv, timed_index
from methods.decode import KVCache, Selection, _Adapter


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
    # what the README's method table says (python -m analysis.readme)
    paper = "Lou et al. 2024"
    kind = "sparse (trainable top-k)"
    official_test = "tests/test_faithful.py::test_sparsek_scorer_and_masked_attention_equal_the_paper"  # the paper (no official code here)
    has_index = True  # the scorer u (not the per-chunk selection), under index_timing
    supports_noncausal = False
    fixed_head_dim = True  # the scoring network is sized by head_dim
    trainable = True
    training_free = False
    impls = ("reference", "gather", "triton")
    last_path: str | None = None  # the path the last call took: reference, gather or triton
    bisect_in_interpreter = False  # the threshold bisection's kernel on the CPU too (slow: its tests)
    _on_gpu = False

    def __init__(self, k: int = 256, window: int = 256, query_chunk: int = 256, impl: str = "gather",
                 kernel_chunk: int = 2048, position_slope: float = 0.0, **structural):
        super().__init__(impl=impl, **structural)
        for name, value in (("k", k), ("window", window), ("query_chunk", query_chunk), ("kernel_chunk", kernel_chunk)):
            check_int("SparseK", name, value)
        self.k, self.window, self.query_chunk = k, window, query_chunk
        # the kernel holds nothing per chunk, so its selection takes at least this many queries
        # at a time (fewer PyTorch passes; the selection's memory is chunk^2 floats per KV head).
        # 2048 since session 17 on the H200 (results/efficiency/kernels/sparsek_chunk_93896d5.jsonl,
        # 64k, B=1, H=32, D=128): forward 49.0 ms (1024: 67.6, launch-bound: 38.6 ms of kernels),
        # backward 144 ms (1024: 109); forward + backward 196 against 182, dense 232
        self.kernel_chunk = kernel_chunk
        self.score = nn.Linear(self.head_dim, 1)  # the scoring network (shared by the KV heads)
        self.position_slope = float(position_slope)

    def hyperparameters(self) -> dict:
        return {"k": self.k, "window": self.window, "position_slope": self.position_slope}

    def scores(self, k):
        """u = k w + b + position_slope * j over the keys' positions j: [B, Hkv, T], computed in
        float32 at least (k and the scorer upcast). In bfloat16 the position term (j up to the
        sequence length) would be rounded to steps of 1 above u = 128, and the weights
        clip(u - tau, 0, 1) with it: a relative output error of 0.15 at 1.5k tokens, slope 0.1,
        against 0.026 for the same attention with float32 scores (session 17)."""
        w = self.score.weight
        dtype = torch.promote_types(w.dtype, torch.float32)
        u = torch.nn.functional.linear(k.to(dtype), w.to(dtype)).squeeze(-1) + self.score.bias.to(dtype)
        if self.position_slope:
            u = u + self.position_slope * torch.arange(k.shape[2], device=k.device, dtype=dtype)
        return u

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

    @torch.no_grad()
    def _soft_mask_rows_fast(self, u, rows, tk, kpm):
        """The same (idx, weight, valid) as ``_soft_mask_rows``, without a [c, T] pass per
        bisection step: the candidates shared by the chunk (j <= rows[0] - window) are sorted
        once, so each row's sum_j clip(u_j - tau, 0, 1) is two binary searches on them plus
        its own newer candidates (fewer than c); the top-k come from the sorted shared part and
        the newer candidates. Forward only (the gradient needs every row's free set)."""
        B, Hkv, T = u.shape
        w, c, dt = self.window, len(rows), u.dtype
        lim = rows - w  # [c]: the last candidate of each row
        first = int(rows[0])
        s0, s1 = max(first - w + 1, 0), max(first + c - w, 0)  # shared: j < s0; newer: s0 <= j < s1
        big = torch.finfo(dt).max / 4
        shared = u[..., :s0]
        ok_sh = torch.ones_like(shared, dtype=torch.bool) if kpm is None else kpm[:, None, :s0].expand_as(shared)
        sv, order = torch.where(ok_sh, shared, torch.full_like(shared, -big)).sort(-1)  # padding first
        L = sv.shape[-1]
        n_sh = ok_sh.sum(-1, keepdim=True)  # [B, Hkv, 1] valid shared candidates (the last n_sh)
        cs = torch.nn.functional.pad(torch.where(sv > -big, sv, 0.0).cumsum(-1), (1, 0))
        new = u[..., s0:s1]  # [B, Hkv, m]: newer candidates
        jn = torch.arange(s0, s1, device=u.device)
        ok_new = (jn.view(1, -1) <= lim.view(-1, 1)).view(1, 1, c, -1)  # [1, 1, c, m]
        if kpm is not None:
            ok_new = ok_new & kpm[:, None, None, s0:s1]
        newc = new.unsqueeze(2)  # [B, Hkv, 1, m]

        def f(tau):  # [B, Hkv, c] -> sum over each row's candidates of clip(u - tau, 0, 1)
            a = torch.searchsorted(sv, tau.contiguous(), right=True)  # entries <= tau
            b = torch.searchsorted(sv, (tau + 1).contiguous(), right=False)  # entries < tau + 1
            out = (L - b) + (cs.gather(-1, b) - cs.gather(-1, a)) - tau * (b - a)
            return out + ((newc - tau.unsqueeze(-1)).clamp(0, 1) * ok_new).sum(-1)

        n = n_sh + ok_new.sum(-1)  # [B, Hkv, c] candidates per row
        if L:
            mn_sh = torch.where(n_sh > 0, sv.gather(-1, (L - n_sh).clamp(max=L - 1)), big)  # [B, Hkv, 1]
            mx_sh = torch.where(n_sh > 0, sv[..., -1:], -big)
        else:
            mn_sh, mx_sh = u.new_full((B, Hkv, 1), big), u.new_full((B, Hkv, 1), -big)
        lo, hi = mn_sh.expand(-1, -1, c), mx_sh.expand(-1, -1, c)
        if new.shape[-1]:
            lo = torch.minimum(lo, torch.where(ok_new, newc, big).amin(-1))
            hi = torch.maximum(hi, torch.where(ok_new, newc, -big).amax(-1))
        lo = lo - 1.0
        kk = torch.clamp(n.to(dt), max=float(self.k))
        iters = 64 if dt == torch.float64 else 30  # as SparseKOp: bisection on tau
        from methods.kernels import sparsek as bsk

        if bsk.usable(u) and (u.is_cuda or self.bisect_in_interpreter):  # the search in one kernel
            bis_v = new if kpm is None else torch.where(kpm[:, None, s0:s1], new, -big)  # padded: no share
            bis_p = jn.view(1, 1, -1).expand(B, Hkv, -1)
            if L >= self.k and bis_v.shape[-1]:
                # tau >= (a row's k-th best) - 1 >= (the shared k-th best) - 1: newer candidates
                # below that add nothing where the search ends (the top-k's weights are the same)
                kth_sh = sv[..., L - self.k:L - self.k + 1]
                low = torch.where(kth_sh > -big, kth_sh - 1, -big)
                n_keep = int((bis_v >= low).sum(-1).max())
                if n_keep < bis_v.shape[-1]:
                    bis_v, at = torch.where(bis_v >= low, bis_v, -big).topk(n_keep, dim=-1)
                    bis_p = at + s0
            flat = lambda x: x.expand(B, Hkv, *x.shape[2:]).reshape(B * Hkv, -1)  # noqa: E731
            lo, hi = (x.view(B, Hkv, c) for x in bsk.sparsek_bisect(
                flat(sv), flat(cs), flat(bis_v), flat(bis_p), lim, flat(lo), flat(hi), flat(kk), iters))
        else:
            for _ in range(iters):
                mid = (lo + hi) / 2
                more = f(mid) > kk
                lo, hi = torch.where(more, mid, lo), torch.where(more, hi, mid)
        tau = torch.where(n <= self.k, lo, (lo + hi) / 2)
        # top-k of each row: the shared part's best (sorted) and the row's newer candidates
        kk_top = min(self.k, max(1, tk - w))
        take = min(kk_top, L)
        top_sh_v, top_sh_i = sv[..., L - take:].flip(-1), order[..., L - take:].flip(-1)
        top_sh_ok = top_sh_v > -big
        # a newer candidate below the shared part's k-th best is in no row's top-k: the pool
        # keeps the newer ones at or above it (all, where the shared part has fewer than k)
        new_ok, new_j = ok_new.expand(B, Hkv, c, -1), jn.view(1, 1, 1, -1).expand(B, Hkv, c, -1)
        if take == kk_top and new.shape[-1]:
            thr = torch.where(top_sh_ok[..., -1:], top_sh_v[..., -1:], -float("inf"))  # [B, Hkv, 1]
            mp = int((new >= thr).sum(-1).max())
            if mp < new.shape[-1]:
                keep_v, keep_i = torch.where(new >= thr, new, -float("inf")).topk(mp, dim=-1)  # [B, Hkv, mp]
                new_ok = torch.gather(new_ok, -1, keep_i.unsqueeze(2).expand(-1, -1, c, -1)) & (keep_v > -big).unsqueeze(2)
                new_j = (keep_i + s0).unsqueeze(2).expand(-1, -1, c, -1)
                newc = keep_v.unsqueeze(2)
        pool_v = torch.cat([top_sh_v.unsqueeze(2).expand(-1, -1, c, -1).masked_fill(~top_sh_ok.unsqueeze(2), -float("inf")),
                            newc.expand(-1, -1, c, -1).masked_fill(~new_ok, -float("inf"))], -1)
        pool_i = torch.cat([top_sh_i.unsqueeze(2).expand(-1, -1, c, -1), new_j], -1)
        if pool_v.shape[-1] < kk_top:  # fewer candidates than k anywhere: pad with empty slots
            padn = kk_top - pool_v.shape[-1]
            pool_v = torch.nn.functional.pad(pool_v, (0, padn), value=-float("inf"))
            pool_i = torch.nn.functional.pad(pool_i, (0, padn), value=0)
        top = pool_v.topk(kk_top, dim=-1)
        idx = pool_i.gather(-1, top.indices)
        ok = torch.isfinite(top.values)
        wsel = ((top.values - tau.unsqueeze(-1)).clamp(0, 1) * ok).nan_to_num(0.0)
        return idx, wsel.to(dt), ok

    @torch.no_grad()
    def _kernel_plan(self, u, shared, first: int, c: int, tk: int) -> dict:
        """The tile kernel's inputs for the c query rows at key positions first .. first + c - 1
        (no padding): the shared candidates (j < s0 = first - window + 1, the same for every row
        of the chunk) sorted ascending with their positions, from ``shared`` (the previous
        chunk's, or None) merged with the keys that joined them; the chunk's newer candidates in
        descending score order, of which each head counts those that can be in a row's top k or
        weigh (``n_new``: at least the shared k-th best - 1, since a row's tau is at least its
        k-th best - 1, which is at least that); then each row's k-th best, tau and pairs attended
        in one kernel (``kernels.sparsek.sparsek_select``). Nothing is read back to the host:
        the sizes follow from first, c and the window. The plan's ``shared`` is the next chunk's."""
        from methods.kernels.sparsek import sparsek_select

        B, Hkv, _ = u.shape
        w, k = self.window, self.k
        s0, s1 = max(first - w + 1, 0), min(max(first + c - w, 0), tk)  # shared: j < s0; newer: s0 <= j < s1
        sv, order = shared if shared is not None else (u[..., :0], torch.zeros_like(u[..., :0], dtype=torch.int32))
        if s0 > sv.shape[-1]:  # the keys that became shared since the last chunk, merged in
            add_v, add_p = u[..., sv.shape[-1]:s0].sort(-1)
            sv, order = _merge_sorted(sv, order, add_v, (add_p + sv.shape[-1]).to(torch.int32))  # int32: as the kernels read it
        cs = torch.nn.functional.pad(sv.cumsum(-1), (1, 0))
        newv, newp = u[..., s0:s1].sort(-1, descending=True)
        newp = newp + s0
        n_new = None
        if s0 >= k and s1 > s0:  # newer ones below the shared k-th best - 1 neither enter a top k nor weigh
            n_new = (newv >= sv[..., s0 - k:s0 - k + 1] - 1).sum(-1)  # [B, Hkv], on the device
        flat = lambda x: x.reshape(B * Hkv, x.shape[-1])  # noqa: E731
        kth, tau, pairs, nfree = (x.view(B, Hkv, c) for x in sparsek_select(
            flat(sv), flat(cs), flat(newv), flat(newp), first, c, w, k, n_new=n_new))
        return dict(sv=sv, order=order, newp=newp, newv=newv, n_new=n_new, tau=tau, kth=kth, pairs=pairs.sum(),
                    nfree=nfree, shared=(sv, order))

    def attend(self, q, k, v, causal, key_padding_mask):
        B, H, tq, D = q.shape
        tk, rep = k.shape[2], H // k.shape[1]
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        with timed_index(self, q):  # the scorer (the selection itself runs per chunk, with the attention)
            u = self.scores(k).to(dt)
        off = tk - tq
        scale = 1.0 / math.sqrt(D)
        outs, counted = [], 0
        grad = torch.is_grad_enabled() and (u.requires_grad or any(t.requires_grad for t in (q, k, v)))
        kernel = self.impl == "triton" and key_padding_mask is None and self._usable(q)
        chunk = tq if self.impl == "reference" else max(self.query_chunk, self.kernel_chunk) if kernel else self.query_chunk
        self.last_path = "triton" if kernel else ("reference" if self.impl == "reference" else "gather")
        self._on_gpu = q.is_cuda
        self.last_kernel_config = {"path": self.last_path, "query_chunk": chunk}  # runner=kernel records it
        if kernel:  # methods/kernels/sparsek.py: a query tile's candidates read once, then its window
            from methods.kernels import sparsek as kern

            self.last_kernel_config.update(tile_rows=kern.TILE_ROWS, tile_keys=kern.TILE_KEYS,
                                           select_rows=kern.SELECT_ROWS, select_iters=kern.select_iters(u.dtype))
            if grad:  # with the kernels' backward
                out = _SparseKKernel.apply(q, k, v, u, self, off, chunk, scale)
            else:
                out, _, self._counted = self._kernel_forward(q, k, v, u, off, chunk, scale, keep_lse=False)
            self.last_density = float(self._counted) / float(B * H * masks.causal_pairs(tq, tk))
            return out.to(q.dtype)
        for a in range(0, tq, chunk):
            b = min(a + chunk, tq)
            rows = torch.arange(a, b, device=q.device) + off
            if grad and self.impl != "reference":  # training: each chunk recomputed in the backward,
                o, n = checkpoint(self._gather_rows, q[:, :, a:b], k, v, u, rows, tk, key_padding_mask,
                                  rep, dt, scale, use_reentrant=False)  # so memory holds one chunk
                outs.append(o)
                counted += n
                continue
            fast = self.impl != "reference" and not (torch.is_grad_enabled() and u.requires_grad)
            select = self._soft_mask_rows_fast if fast else self._soft_mask_rows
            idx, wsel, ok = select(u, rows, tk, key_padding_mask)  # [B, Hkv, c, k']
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
        self.last_density = float(counted) / float(B * H * masks.causal_pairs(tq, tk))
        return torch.cat(outs, 2).to(q.dtype)

    def _kernel_forward(self, q, k, v, u, off: int, chunk: int, scale: float, keep_lse: bool):
        """The kernel path's forward, chunk by chunk (``_kernel_plan``, then
        ``sparsek_tile_attention``): (out, each row's log2-sum-exp2 [B, H, tq] fp32 when
        ``keep_lse``, the pairs attended as a device tensor: no host read per chunk)."""
        from methods.kernels.sparsek import sparsek_tile_attention

        B, H, tq, _ = q.shape
        tk, rep = k.shape[2], H // k.shape[1]
        outs, lses, counted, shared = [], [], 0, None
        for a in range(0, tq, chunk):
            b = min(a + chunk, tq)
            plan = self._kernel_plan(u.detach(), shared, a + off, b - a, tk)
            shared = plan["shared"]
            lse = torch.empty(B, H, b - a, device=q.device, dtype=torch.float32) if keep_lse else None
            outs.append(sparsek_tile_attention(q[:, :, a:b], k, v, plan, a + off, self.window, scale, lse=lse))
            lses.append(lse)
            counted = counted + plan["pairs"] * rep + B * H * masks.window_pairs(a + off, b + off, self.window)
        return torch.cat(outs, 2), (torch.cat(lses, 2) if keep_lse else None), counted

    @staticmethod
    def _usable(q) -> bool:
        from methods.kernels.sparsek import usable

        D = q.shape[-1]
        return usable(q) and D >= 16 and not D & (D - 1)

    @property
    def real_kernel(self) -> bool:
        """Skipped work really skipped: the gather path, and the kernel when compiled (on the GPU;
        Triton's interpreter runs the same kernel, but is no speed test)."""
        return self._on_gpu if self.last_path == "triton" else self.impl != "reference"

    def _gather_rows(self, q, k, v, u, rows, tk, kpm, rep, dt, scale):
        """The gather path for the query rows ``rows`` with gradients: selection (the operator
        on full rows, for its backward) and attention. Returns (out, pairs attended)."""
        idx, wsel, _ = self._soft_mask_rows(u, rows, tk, kpm)
        return self._gather_chunk(q.to(dt), k, v, idx, wsel, rows, kpm, rep, dt, scale)

    def _gather_chunk(self, qc, k, v, idx, wsel, rows, kpm, rep, dt, scale, span=None):
        """Selected keys are gathered ([c, k, D] per head); the window is the contiguous slab of
        keys (rows[0] - window, rows[-1]] shared by the chunk, masked to each query's band.
        ``span``: (rows[0], rows[-1]) as Python ints where the caller knows them (the decode
        step): then nothing is read back to the host (a CUDA graph can replay it) and the
        count of pairs is not taken (None)."""
        B, Hkv, c, kk = idx.shape
        D, w = k.shape[-1], self.window
        gi = idx.reshape(B, Hkv, c * kk, 1).expand(-1, -1, -1, D)
        ks = repeat_kv(torch.gather(k, 2, gi).to(dt).view(B, Hkv, c * kk, D), rep)  # [B, H, c*k, D]
        vs = repeat_kv(torch.gather(v, 2, gi).to(dt).view(B, Hkv, c * kk, D), rep)
        H = Hkv * rep
        s_sel = (qc.unsqueeze(-2) @ ks.view(B, H, c, kk, D).transpose(-1, -2)).squeeze(-2) * scale  # [B, H, c, k]
        first, last = (int(rows[0]), int(rows[-1])) if span is None else span
        lo, hi = max(0, first - w + 1), last + 1
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
        count = None if span is not None else int((m > 0).sum())  # pairs really attended (weight > 0, window)
        return out, count

    def decode_adapter(self) -> SparseKDecode:
        """The decode path over a KV cache (``methods.decode``): scores kept, top-k plus window."""
        return SparseKDecode(self)

    def cost(self, tq, tk, causal) -> Cost:
        off = tk - tq
        pairs = sum(min(self.window, i + off + 1) + min(self.k, max(0, i + off + 1 - self.window))
                    for i in range(tq))
        dense_pairs = masks.causal_pairs(tq, tk)
        flops = 4.0 * self.num_heads * self.head_dim * pairs + 2.0 * self.num_kv_heads * tk * self.head_dim
        return Cost(flops=flops, density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)


class _SparseKKernel(torch.autograd.Function):
    """The kernel path with gradients (training): the forward keeps each row's log-sum-exp; the
    backward walks the chunks again (their selection recomputed, ``SparseK._kernel_plan``) with
    ``sparsek_tile_backward``: dQ per tile, dK and dV added per key, and the scores' gradient
    through the weights w_ij = clip(u_j - tau_i, 0, 1) of the selected pairs. That gradient is
    the operator's: per row, on its free set F_i (0 < w < 1), du_j = g_ij - mean_{F_i} g (g_ij =
    dL/dw_ij, 0 off the top k), so

        du_j = sum_{i: j in F_i, j selected} g_ij  -  sum_{i: j in F_i} gbar_i,   gbar_i = A_i / |F_i|

    The first sum and A_i (row sums of g over the free selected pairs, summed over the query
    heads sharing the KV head) come from the kernel. For the second: tau_i does not decrease
    along the rows (each row's candidates include the previous row's), so the rows with
    tau_i < u_j < tau_i + 1 are one interval, found by binary search over tau, and the sum is a
    difference of prefix sums of gbar."""

    @staticmethod
    def forward(ctx, q, k, v, u, method, off, chunk, scale):
        out, lse, counted = method._kernel_forward(q, k, v, u, off, chunk, scale, keep_lse=True)
        method._counted = counted
        ctx.save_for_backward(q, k, v, u, out, lse)
        ctx.method, ctx.off, ctx.chunk, ctx.scale = method, off, chunk, scale
        return out

    @staticmethod
    def backward(ctx, do):
        from methods.kernels.sparsek import sparsek_tile_backward

        q, k, v, u, out, lse = ctx.saved_tensors
        m, off, chunk, scale = ctx.method, ctx.off, ctx.chunk, ctx.scale
        B, H, tq, D = q.shape
        Hkv, tk = k.shape[1], k.shape[2]
        do = do.contiguous()
        delta = (do.float() * out.float()).sum(-1)  # [B, H, tq]
        dk = torch.zeros(B, Hkv, tk, D, device=q.device, dtype=torch.float32)
        dv, du = torch.zeros_like(dk), torch.zeros(B, Hkv, tk, device=q.device, dtype=torch.float32)
        dqs, rows_a, taus, nfree, shared = [], [], [], [], None
        with torch.no_grad():
            for a in range(0, tq, chunk):
                b = min(a + chunk, tq)
                plan = m._kernel_plan(u.detach(), shared, a + off, b - a, tk)
                shared = plan["shared"]
                dq, a_row = sparsek_tile_backward(q[:, :, a:b], k, v, do[:, :, a:b], lse[..., a:b], delta[..., a:b],
                                                  plan, a + off, m.window, dk, dv, du, scale)
                dqs.append(dq)
                rows_a.append(a_row)
                taus.append(plan["tau"])
                nfree.append(plan["nfree"])
            A = torch.cat(rows_a, 2).view(B, Hkv, H // Hkv, tq).sum(2)  # [B, Hkv, tq]
            tau, nf = torch.cat(taus, 2).contiguous(), torch.cat(nfree, 2)
            gbar = torch.where(nf > 0, A / nf.clamp_min(1), 0.0)
            G = torch.nn.functional.pad(gbar.cumsum(-1), (1, 0))  # [B, Hkv, tq + 1]
            uu = u.detach().float().contiguous()
            hi = torch.searchsorted(tau.float(), uu, right=False)  # rows with tau < u_j: [0, hi)
            lo = torch.searchsorted(tau.float(), uu - 1, right=True)  # rows with tau > u_j - 1: [lo, tq)
            first = (torch.arange(tk, device=q.device) + m.window - off).clamp(0, tq)  # j <= pos_i - window
            lo = torch.maximum(lo, first.expand_as(lo))
            du -= torch.where(hi > lo, G.gather(-1, hi) - G.gather(-1, lo.clamp(max=tq)), 0.0)
        return (torch.cat(dqs, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), du.to(u.dtype), None, None, None, None)


def _merge_sorted(av, ap, bv, bp):
    """Merge two ascending rows (values av, bv [..., La], [..., Lb] with payloads ap, bp) into one
    ascending row of La + Lb: each entry's place is its index plus the count of the other row's
    entries before it (a's first among equal values), found by binary search."""
    ia = torch.arange(av.shape[-1], device=av.device) + torch.searchsorted(bv.contiguous(), av.contiguous(), right=False)
    ib = torch.arange(bv.shape[-1], device=bv.device) + torch.searchsorted(av.contiguous(), bv.contiguous(), right=True)
    shape = (*av.shape[:-1], av.shape[-1] + bv.shape[-1])
    v = av.new_empty(shape).scatter_(-1, ia, av).scatter_(-1, ib, bv)
    p = ap.new_empty(shape).scatter_(-1, ia, ap).scatter_(-1, ib, bp)
    return v, p


def _weighted_softmax(s, m):
    """softmax with multiplicative weights m >= 0: m exp(s) / sum m exp(s); rows of m = 0 give 0."""
    s = s.masked_fill(m <= 0, float("-inf"))
    mx = s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    e = torch.exp(s - mx) * m
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)


class SparseKDecode(_Adapter):
    """SparseK's decode path: the cache keeps every key and value (any earlier key can be among
    the top k) and, as its index, the scoring network's score of each (``score`` [B, Hkv,
    capacity], fp32): u_j = w . k_j + b + position_slope * j, computed once, when key j arrives
    (the prefill scores its keys). At position t the candidates are the keys j <= t - window;
    the SparseK operator over their scores gives the weights p and the top k of them are read
    with their weights, the ``window`` most recent keys with weight 1 (readings (1)-(4) of the
    module docstring), so that the step's output equals the prefill's row t. Bytes read: the
    candidates' scores (index) and the K/V rows of the top k (weight > 0) and the window.
    ``select`` and ``attend_selected`` read nothing back to the host (the row and the window's
    span as Python ints, no count of pairs): ``runner=decode`` can replay them from a CUDA graph
    (tests/test_decode_sync.py)."""

    def decode_params(self) -> dict:
        return self.method.hyperparameters()

    def _dt(self, cache) -> torch.dtype:
        return torch.float64 if cache.dtype == torch.float64 else torch.float32

    def build_index(self, cache: KVCache) -> None:
        B, Hkv, C, _ = cache.k.shape
        cache.aux["score"] = torch.zeros(B, Hkv, C, dtype=self._dt(cache), device=cache.device)
        cache.aux["score"][:, :, :cache.length] = self.method.scores(cache.keys())

    def update_index(self, cache: KVCache, k_t, v_t) -> None:
        m, t = self.method, cache.length - 1
        u = m.score(k_t.to(m.score.weight.dtype)).squeeze(-1)  # [B, Hkv, 1]
        if m.position_slope:
            u = u + m.position_slope * torch.tensor([t], device=u.device, dtype=u.dtype)
        cache.aux["score"][:, :, t] = u[:, :, 0]

    def select(self, q_t, cache: KVCache) -> Selection:
        self._check_q(q_t, cache)
        m, S = self.method, cache.length
        t, rep, w = S - 1, self.num_heads // self.num_kv_heads, m.window
        rows = torch.full((1,), t, dtype=torch.long, device=q_t.device)  # a fill, not a copy from the host
        with torch.no_grad():
            idx, wsel, ok = m._soft_mask_rows(cache.aux["score"][:, :, :S], rows, S, None)  # [B, Hkv, 1, k']
        win = torch.arange(max(0, t - w + 1), t + 1, device=q_t.device).expand(*idx.shape[:2], -1)
        slots = torch.cat([idx[:, :, 0], win], -1).repeat_interleave(rep, 1)
        valid = torch.cat([ok[:, :, 0] & (wsel[:, :, 0] > 0), torch.ones_like(win, dtype=torch.bool)], -1)
        cand = max(0, t - w + 1)  # the candidates' scores are read
        index_bytes = float(cache.batch * cache.num_kv_heads * cand * cache.aux["score"].element_size())
        return Selection(slots=slots, valid=valid.repeat_interleave(rep, 1), index_bytes=index_bytes,
                         extra={"idx": idx, "wsel": wsel, "rows": rows, "span": (t, t)})

    def attend_selected(self, q_t, cache: KVCache, sel: Selection) -> torch.Tensor:
        x, dt = sel.extra, self._dt(cache)
        out, _ = self.method._gather_chunk(q_t.to(dt), cache.keys(), cache.values(), x["idx"], x["wsel"], x["rows"],
                                           None, self.num_heads // self.num_kv_heads, dt,
                                           1.0 / math.sqrt(q_t.shape[-1]), span=x["span"])
        return out.to(q_t.dtype)
