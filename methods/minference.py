"""MInference-style training-free sparse prefill: A-shape, vertical-slash, block-sparse.

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention" (NeurIPS 2024), Sec. 3 and Alg. 1-3; defaults follow the official code
(microsoft/MInference: ``vertical_and_slash_kernel``, ``block_sparse_kernel`` and the CUDA
``convert_vertical_slash_indexes``). Causal (prefill) only.

a_shape         the first ``num_sink`` keys plus a local window of ``window`` keys
vertical_slash  Alg. 2: the pattern is estimated from the last ``last_q`` queries (official:
                64): their causal attention is summed per key column (verticals) and per
                diagonal (slashes). The first ``forced_sink`` columns and the ``forced_local``
                nearest diagonals (official: 30 and 100) are always chosen and count against
                the budgets; the rest of the ``vertical_size`` columns and ``slash_size``
                diagonals are the estimate's best (a forced count above its budget is cut to
                it). ``slash_mode`` says what a chosen diagonal o = i - j keeps:
                  ranges (default, the official kernel) per block row of 64 queries
                          [m0, m0 + 64), the 64-wide column range [m0 - o, m0 + 64 - o) it
                          crosses (``convert_vertical_slash_indexes``: the start clamped to
                          0, offsets >= m0 + 64 skipped, ranges merged in steps of 64 as the
                          official loop merges them); verticals count only below the block
                          row's last range end (they are columns outside the ranges there)
                  lines   exactly the single diagonal (the paper's figure; kept as an option)
                so with ranges a row keeps up to vertical_size + 64 * slash_size keys: the
                default budget, 256 columns and 128 diagonals (30 and 100 of them forced), is
                at most 256 + 8192 key tokens per row; its effective density (``last_density``,
                recorded) on the fidelity task's structured inputs was about 0.8 at 2k,
                0.5 at 4k, 0.28 at 8k and 0.15 at 16k tokens
block_sparse    Alg. 3: q and k are mean-pooled over blocks of ``block_size`` (a last partial
                block zero-padded and divided by ``block_size``, as the official code); each
                query block keeps its ``top_k_blocks`` best causal key blocks by pooled score (the
                official code does not force the diagonal block; ``force_diagonal_block``
                does)
searched        each head uses the pattern and budget stored for it in ``pattern_file``,
                written by ``calibrate`` (scripts/minference_search.py runs it)

Deviations from the official code: the estimate's scores use 1/sqrt(head_dim) (the official
code divides by sqrt(128) whatever the head dim), and budgets are not raised to the official
minima (30 columns, 50 diagonals). ``calibrate(samples)`` picks per head, among candidate
patterns and budgets, the one that keeps the most attention mass within a density budget.
Decode steps (one query) fall back to dense attention: ``last_fallback`` says so.

The index step (the vertical/slash estimate, the pooled block choice) is timed into
``last_index_ms`` under ``methods.base.index_timing(True)`` (A-shape heads build none).
``last_density`` is the effective density: the causal pairs the construction keeps over all
causal pairs (not the tiles a kernel visits).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from methods import masks
from methods.base import Cost, SparseMethod, check_int, masked_attention, repeat_kv, timed_index

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
A, VS, BS = range(3)
SLASH_MODES = ("ranges", "lines")
VS_BLOCK = 64  # the official kernel's block rows and range width (block_size_M = block_size_N = 64)
NONE = 2**40  # "no range" in the sorted range starts
HEAD_KEYS = dict(num_sink=0, window=0, vertical_size=0, slash_size=0, forced_sink=30, forced_local=100,
                 top_k_blocks=0)  # a head's budgets (pattern files may leave out those it does not use)


class MInference(SparseMethod):
    name = "minference"
    # what the README's method table says (python -m analysis.readme)
    paper = "Jiang et al. 2024"
    kind = "sparse (data-dependent), training-free"
    official_test = "tests/test_faithful.py::test_minference_index_and_mask_equal_the_official_construction"
    supports_noncausal = False
    training_free = True
    has_index = True  # vertical-slash and block-sparse heads: their index step, under index_timing

    impls = ("reference", "flex", "triton")

    def __init__(self, pattern: str = "vertical_slash", num_sink: int = 64, window: int = 512,
                 vertical_size: int = 256, slash_size: int = 128, forced_sink: int = 30,
                 forced_local: int = 100, slash_mode: str = "ranges", block_size: int = 64,
                 top_k_blocks: int = 16, force_diagonal_block: bool = False, last_q: int = 64,
                 pattern_file: str | None = None, impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        if pattern not in (*PATTERNS, "searched"):
            raise ValueError(f"MInference: pattern must be one of {[*PATTERNS, 'searched']}, got {pattern!r}")
        if slash_mode not in SLASH_MODES:
            raise ValueError(f"MInference: slash_mode must be one of {SLASH_MODES}, got {slash_mode!r}")
        budgets = dict(num_sink=num_sink, window=window, vertical_size=vertical_size, slash_size=slash_size,
                       forced_sink=forced_sink, forced_local=forced_local, top_k_blocks=top_k_blocks,
                       block_size=block_size, last_q=last_q)
        for key, val in budgets.items():  # integers; block_size and last_q at least 1
            check_int("MInference", key, val, lo=1 if key in ("block_size", "last_q") else 0)
        self.pattern, self.slash_mode, self.force_diagonal_block = pattern, slash_mode, force_diagonal_block
        H = self.num_heads
        heads = [dict(pattern=pattern, num_sink=num_sink, window=window, vertical_size=vertical_size,
                      slash_size=slash_size, forced_sink=forced_sink, forced_local=forced_local,
                      top_k_blocks=top_k_blocks)] * H
        if pattern == "searched":
            if not pattern_file:
                raise ValueError("MInference: pattern=searched needs pattern_file (see calibrate)")
            heads = load_patterns(pattern_file, H)
        self.heads = heads
        self.static_mask = all(h["pattern"] == "a_shape" for h in heads)  # no index building
        self.block_size, self.last_q = block_size, last_q
        self.last_fallback: str | None = None

    def hyperparameters(self) -> dict:
        return {"pattern": self.pattern, "heads": self.heads, "block_size": self.block_size,
                "last_q": self.last_q, "slash_mode": self.slash_mode,
                "force_diagonal_block": self.force_diagonal_block}

    def _per_head(self, key, device):
        return torch.tensor([h.get(key, 0) for h in self.heads], device=device)

    # ---- index building -----------------------------------------------------------------
    def vertical_slash_sets(self, q, k):
        """[B, H, Tk] bool verticals (by key index) and slashes (by offset i - j): the official
        ``vertical_and_slash_kernel``'s choice from the last ``last_q`` queries."""
        B, H, tq, D = q.shape
        tk = k.shape[2]
        lq = min(self.last_q, tq)
        kk = repeat_kv(k, H // k.shape[1])
        s = (q[:, :, -lq:].float() @ kk.float().transpose(-1, -2)) / math.sqrt(D)  # [B, H, lq, Tk]
        pos = torch.arange(tk - lq, tk, device=q.device).view(lq, 1)
        kidx = torch.arange(tk, device=q.device).view(1, tk)
        s = s.masked_fill(kidx > pos, float("-inf"))
        p = torch.softmax(s, -1)
        vert = p.sum(2)  # [B, H, Tk]
        off = (pos - kidx).clamp_min(0).expand(lq, tk)  # diagonal of each entry
        slash = torch.zeros(B, H, tk, device=q.device).scatter_add_(
            2, off.reshape(1, 1, -1).expand(B, H, -1), p.reshape(B, H, -1))
        sink, loc = self._per_head("forced_sink", q.device), self._per_head("forced_local", q.device)
        ar = torch.arange(tk, device=q.device).view(1, 1, tk)
        vert = vert.masked_fill(ar < sink.view(1, H, 1), float("inf"))
        slash = slash.masked_fill(ar < loc.view(1, H, 1), float("inf"))
        nv, ns = ([int(h.get(key, 0)) for h in self.heads] for key in ("vertical_size", "slash_size"))
        return _top_per_head(vert, nv), _top_per_head(slash, ns)

    def vertical_slash_index(self, q, k) -> dict:
        """The vertical-slash heads' index: ``vert``, ``slash`` (``vertical_slash_sets``) and, for
        ``slash_mode=ranges``, ``starts``, ``end``, ``cover_a``, ``cover_b`` (``slash_ranges``,
        ``range_cover``) over the block rows of 64 key positions."""
        vert, slash = self.vertical_slash_sets(q, k)
        idx = dict(vert=vert, slash=slash)
        if self.slash_mode == "ranges":
            starts, end = slash_ranges(slash, n=max(int(h.get("slash_size", 0)) for h in self.heads))
            a, b = range_cover(starts, k.shape[2])
            idx.update(starts=starts, end=end, cover_a=a, cover_b=b)
        return idx

    score_bytes = 1 << 30  # block_sparse: pooled scores held at once (query blocks chunked to fit)

    def _block_picks(self, q, k):
        """Per chunk of query blocks (first block, picks [B, H, c, n] of key blocks in increasing
        order, nk where fewer than n blocks are causal), from the mean-pooled q and k."""
        B, H, tq, D = q.shape
        tk, bs = k.shape[2], self.block_size
        nq, nk = math.ceil(tq / bs), math.ceil(tk / bs)
        pq = _pool(q, bs)  # [B, H, nq, D] fp32
        pk = repeat_kv(_pool(k, bs), H // k.shape[1])  # [B, H, nk, D]
        budget = [min(int(h.get("top_k_blocks", 0)), nk) for h in self.heads]
        width = max(budget + [1])
        kb = torch.arange(nk, device=q.device).view(1, nk)
        rank = torch.arange(width, device=q.device).view(1, 1, 1, width)
        per_head = torch.tensor(budget, device=q.device).view(1, H, 1, 1)
        rows = max(1, self.score_bytes // (4 * B * H * nk))
        for a in range(0, nq, rows):
            c = min(rows, nq - a)
            qb = torch.arange(a, a + c, device=q.device).view(c, 1) + (nk - nq)
            s = pq[:, :, a:a + c] @ pk.transpose(-1, -2)  # [B, H, c, nk]
            s = s.masked_fill(kb > qb, float("-inf"))
            if self.force_diagonal_block:
                s = s.masked_fill(kb == qb, float("inf"))
            # one top-k of the largest budget; each head keeps its own budget's first picks
            picks = torch.where(rank < per_head, s.topk(width, dim=-1).indices, nk) if max(budget) else \
                torch.full((B, H, c, width), nk, device=q.device, dtype=torch.long)
            yield a, torch.where(picks <= qb, picks, nk).sort(-1).values

    def block_layout(self, q, k):
        """[B, H, nq, nk] bool: the top_k_blocks key blocks of each query block."""
        B, H = q.shape[:2]
        nq, nk = math.ceil(q.shape[2] / self.block_size), math.ceil(k.shape[2] / self.block_size)
        lay = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=q.device)  # column nk: no pick
        for a, picks in self._block_picks(q, k):
            lay[:, :, a:a + picks.shape[2]].scatter_(-1, picks, True)
        return lay[..., :nk]

    def block_lists(self, q, k):
        """``layout_to_lists(block_layout(q, k))`` without the [nq, nk] layout: (idx [B, H, nq, m]
        int32, cnt [B, H, nq]), the memory of the pooled scores bounded by ``score_bytes``."""
        nk = math.ceil(k.shape[2] / self.block_size)
        idx = torch.cat([picks for _, picks in self._block_picks(q, k)], 2)
        cnt = (idx < nk).sum(-1, dtype=torch.int32)
        width = max(1, int(cnt.max()))
        return idx[..., :width].to(torch.int32).contiguous(), cnt.contiguous()

    def mask_mod(self, q, k, causal):
        dev = q.device
        kinds = {h["pattern"] for h in self.heads}
        pid = torch.tensor([PATTERNS.index(h["pattern"]) for h in self.heads], device=dev)
        off, bs = k.shape[2] - q.shape[2], self.block_size
        sink, win = self._per_head("num_sink", dev), self._per_head("window", dev)
        vs = lay = None
        with timed_index(self, q):  # the index step (vertical/slash sets, block layout)
            if "vertical_slash" in kinds:
                vs = self.vertical_slash_index(q, k)
            if "block_sparse" in kinds:
                lay = self.block_layout(q, k)
        heads_of = lambda kind: [i for i, h in enumerate(self.heads) if h["pattern"] == kind]  # noqa: E731
        self._index = {}  # per pattern: (its heads, their index), for the effective density
        if vs is not None:
            self._index["vertical_slash"] = (heads_of("vertical_slash"), vs)
        if lay is not None:
            self._index["block_sparse"] = (heads_of("block_sparse"), dict(layout=lay))
        nqb = math.ceil(q.shape[2] / bs)
        nkb = math.ceil(k.shape[2] / bs)
        ranges = self.slash_mode == "ranges"

        def minference_mask(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            out = (pid[h] == A) & ((kv_idx < sink[h]) | (d < win[h]))
            if vs is not None:
                if ranges:  # the block row's ranges, or a vertical below its last range's end
                    r, c, w = (q_idx + off) // VS_BLOCK, kv_idx // VS_BLOCK, kv_idx % VS_BLOCK
                    keep = (w < vs["cover_a"][b, h, r, c]) | (w >= vs["cover_b"][b, h, r, c]) | (
                        vs["vert"][b, h, kv_idx] & (kv_idx < vs["end"][b, h, r]))
                else:
                    keep = vs["vert"][b, h, kv_idx] | vs["slash"][b, h, d.clamp(0, k.shape[2] - 1)]
                out = out | ((pid[h] == VS) & keep)
            if lay is not None:
                qb = (q_idx + off) // bs - (nkb - nqb)
                out = out | ((pid[h] == BS) & lay[b, h, qb, kv_idx // bs])
            return out

        return minference_mask

    def flex_layout(self, q, k, causal, block):
        """The blocks of ``mask_mod`` at FlexAttention's ``block`` from the index its call
        built (``self._index``), per head by pattern: A-shape from its sink and window
        (``flex.band``: touched and wholly kept blocks), block-sparse from its layout
        (``flex.coarsen``), vertical-slash (no full blocks) from ``_vs_blocks``. None where
        the blocks do not divide (then ``create_block_mask``)."""
        from methods.kernels import flex

        B, H, T, _ = q.shape
        dev = q.device
        pid = torch.tensor([PATTERNS.index(h["pattern"]) for h in self.heads], device=dev).view(1, H, 1, 1)
        sink = self._per_head("num_sink", dev).view(H, 1, 1)
        win = self._per_head("window", dev).view(H, 1, 1)
        w_any, w_full = flex.band(T, T, block, -(2**40), win - 1, dev)
        nk = w_any.shape[-1]
        ks = torch.arange(nk, device=dev).view(1, nk) * block
        ke = torch.clamp(ks + block - 1, max=T - 1)
        any_ = (pid == A) & ((ks < sink) | w_any).unsqueeze(0)
        full = (pid == A) & ((ke < sink) | w_full).unsqueeze(0)
        if "block_sparse" in self._index:
            lay = flex.coarsen(self._index["block_sparse"][1]["layout"], self.block_size, self.block_size, block, T, T)
            if lay is None:
                return None
            any_, full = any_ | ((pid == BS) & lay[0]), full | ((pid == BS) & lay[1])
        if "vertical_slash" in self._index:
            touched = self._vs_blocks(self._index["vertical_slash"][1], T, block)
            if touched is None:
                return None
            any_ = any_ | ((pid == VS) & touched)
        return any_, full

    vs_cells = 1 << 24  # _vs_blocks: cells (B x H x rows x columns) held at once (rows chunked)

    def _vs_blocks(self, vs, T, block):
        """[B, H, nq, nk] bool: the blocks of ``block`` that the vertical-slash index touches
        (causal pairs), exactly: on a grid of g = gcd(block, 64) cells, a vertical column in
        the cell's keys at or before its last query (and, for ranges, before the row's
        ``end``), a slash (lines) whose diagonal crosses the cell, or (ranges) a covered
        column (``cover_a``, ``cover_b``) in the cell; the cells OR-ed into blocks, by chunks
        of whole block rows of at most ``vs_cells`` cells."""
        from methods.kernels import flex

        g = math.gcd(block, VS_BLOCK)
        B, H = vs["vert"].shape[:2]
        dev = vs["vert"].device
        n, fr = math.ceil(T / g), block // g
        s0 = torch.arange(n, device=dev) * g
        s1 = torch.clamp(s0 + g - 1, max=T - 1)
        ks, ke = s0.view(1, n), s1.view(1, n)
        counts = {key: torch.nn.functional.pad(vs[key].to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
                  for key in ("vert", "slash")}

        def any_in(key, lo, hi):  # a True in vs[key][..., lo..hi] (empty where hi < lo)
            c = counts[key]
            lo, hi = (x.expand(B, H, *x.shape[-2:]) for x in torch.broadcast_tensors(lo, hi))
            get = lambda i: c.gather(-1, i.clamp(0, T).reshape(B, H, -1)).view(i.shape)  # noqa: E731
            return (hi >= lo) & (get(hi + 1) > get(lo))

        step = max(fr, self.vs_cells // max(1, B * H * n) // fr * fr)
        out = []
        for a in range(0, n, step):
            rows = torch.arange(a, min(a + step, n), device=dev)
            q0, qmax = s0[rows].view(-1, 1), s1[rows].view(-1, 1)
            hi = torch.minimum(ke, qmax)  # the cell's last causal key
            if self.slash_mode == "lines":
                cell = any_in("vert", ks, hi) | any_in("slash", (q0 - ke).clamp_min(0), qmax - ks)
            else:
                r, c = (q0 // VS_BLOCK).view(-1), (s0 // VS_BLOCK).view(1, n)
                end = vs["end"][:, :, r].unsqueeze(-1)  # [B, H, rows, 1]
                cell = any_in("vert", ks, torch.minimum(hi, end - 1))
                ca, cb = vs["cover_a"][:, :, r.view(-1, 1), c].long(), vs["cover_b"][:, :, r.view(-1, 1), c].long()
                lo_in = ks % VS_BLOCK
                cell = cell | ((hi >= ks) & ((lo_in < ca) | (lo_in + (hi - ks) >= cb)))
            out.append(flex.coarsen(cell, g, g, block, min(T, (a + step) * g) - a * g, T)[0])
        return torch.cat(out, -2)

    vs_block = 64  # square tile of the vertical-slash kernel

    def triton_attend(self, q, k, v, causal, key_padding_mask):
        """Each pattern's kernel on the heads that use it (A-shape and block-sparse through the
        block-sparse kernel, vertical-slash through its own)."""
        from methods.kernels import block_sparse as bsk
        from methods.kernels import vertical_slash as vsk

        if key_padding_mask is not None:
            return None  # prefill of padded batches: the flex path
        B, H, T, D = q.shape
        rep = H // k.shape[1]
        kinds = [h["pattern"] for h in self.heads]
        out, work = torch.zeros_like(q), 0.0
        self._index = {}
        for kind in PATTERNS:
            hs = [i for i, p in enumerate(kinds) if p == kind]
            if not hs:
                continue
            sub = len(hs) < H  # a searched mix: this pattern's heads on their own
            qs, ks, vs = q, k, v
            if sub:
                qs = q[:, hs]
                ks, vs = (repeat_kv(x, rep)[:, hs] for x in (k, v))
            heads = [self.heads[i] for i in hs]
            if kind == "a_shape":  # data-independent: the tile lists are cached per length
                win = tuple(h["window"] for h in heads)
                sink = tuple(h["num_sink"] for h in heads)
                tiles = bsk.tiles_for(D, T, q.dtype, True, window=max(win) + max(sink), grad=self._wants_grad(q, k, v))
                self.last_kernel_config["a_shape"] = tiles
                bm, bn = tiles["block_m"], tiles["block_n"]
                idx, cnt, nin = bsk.window_lists(T, bm, bn, True, win, (bsk.BIG,) * len(win), sink, str(q.device))
                o = bsk.block_sparse_attention(qs, ks, vs, idx, cnt, nin=nin, block_m=bm, block_n=bn, causal=True,
                                               win_l=torch.tensor(win), sink=torch.tensor(sink),
                                               num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
                work += bsk.tile_work(cnt, bm, bn, B, len(hs))
            elif kind == "block_sparse":
                bs = self.block_size
                m = self if not sub else self._subset(hs)
                with timed_index(self, q):
                    idx, cnt = m.block_lists(qs, ks)
                self._index[kind] = (hs, dict(idx=idx, cnt=cnt))
                o = bsk.block_sparse_attention(qs, ks, vs, idx, cnt, block_m=bs, block_n=bs, causal=True)
                work += bsk.tile_work(cnt, bs, bs, B, len(hs))
            else:
                m = self if not sub else self._subset(hs)
                with timed_index(self, q):
                    index = m.vertical_slash_index(qs, ks)
                self._index[kind] = (hs, index)
                if self.slash_mode == "ranges":  # the official 64-wide ranges: block-sparse launches
                    o, w = ranges_attention(qs, ks, vs, index)
                    work += w
                else:  # exact diagonals: the vertical-slash kernel
                    vert, slash = index["vert"], index["slash"]
                    plan = vsk.vertical_slash_plan(vert, slash, self.vs_block)
                    o = vsk.vertical_slash_attention(qs, ks, vs, vert, slash, self.vs_block, plan=plan)
                    work += vsk.vertical_slash_work(plan)
            if sub:
                out[:, hs] = o
            else:
                out = o
        return out, work

    def _subset(self, hs):
        """This method restricted to heads ``hs`` (for a searched mix of patterns)."""
        m = copy.copy(self)
        m.heads, m.num_heads, m.num_kv_heads = [self.heads[i] for i in hs], len(hs), len(hs)
        return m

    def attend(self, q, k, v, causal, key_padding_mask):
        if q.shape[2] == 1:  # decode step: dense
            self.last_fallback, self.last_density = "dense", 1.0
            mask = masks.attention_mask(q.shape[0], q.shape[1], 1, k.shape[2], causal,
                                        key_padding_mask, q.device)
            return masked_attention(q, k, v, mask)
        self.last_fallback = None
        self._index = {}
        out = super().attend(q, k, v, causal, key_padding_mask)
        if key_padding_mask is None:  # the effective density of the construction (padding: the path's count)
            # counted when read, not here: the call is what runner=kernel times, and the count is
            # host work (A-shape: a [T] range per head; block-sparse: an [nq, nk] table copied to
            # the device and a sync) that took 42 of 47 ms at 128k on an H200 (issue 28)
            self._density_of = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return out

    @property
    def last_density(self) -> float | None:
        """The last call's density: without padding, the effective density of the construction
        (``effective_pairs`` over the causal pairs), counted on the first read after the call."""
        pending = self.__dict__.get("_density_of")
        if pending is not None:
            B, H, tq, tk = pending
            self.__dict__["_last_density"] = self.effective_pairs(B, tq, tk) / float(B * H * masks.causal_pairs(tq, tk))
            self.__dict__["_density_of"] = None
        return self.__dict__.get("_last_density")

    @last_density.setter
    def last_density(self, value: float | None) -> None:
        self.__dict__["_density_of"], self.__dict__["_last_density"] = None, value

    def effective_pairs(self, B, tq, tk) -> float:
        """Causal (query, key) pairs the last call's construction kept, summed over the batch (B)
        and heads (A-shape from its budgets, the others from the index the call built)."""
        off = tk - tq
        total = 0.0
        for h in self.heads:
            if h["pattern"] == "a_shape":
                total += B * _ashape_pairs(tq, tk, h["num_sink"], h["window"])
        if "vertical_slash" in self._index:
            hs, d = self._index["vertical_slash"]
            sel = lambda t: t[:, hs] if t.shape[1] != len(hs) else t  # noqa: E731 - index of all heads (mask_mod)
            d = {key: sel(t) for key, t in d.items()}
            total += ranges_pairs(d, tq, tk) if self.slash_mode == "ranges" else lines_pairs(d, tq, tk)
        if "block_sparse" in self._index:
            hs, d = self._index["block_sparse"]
            bs = self.block_size
            nq, nk = math.ceil(tq / bs), math.ceil(tk / bs)
            qb = torch.arange(nq).view(nq, 1) * bs
            kb = torch.arange(nk).view(1, nk) * bs
            per = _pairs_below(qb + off, torch.clamp(qb + bs, max=tq) + off, kb, torch.clamp(kb + bs, max=tk))
            per = torch.cat([per, torch.zeros(nq, 1, dtype=per.dtype)], 1).to(next(iter(d.values())).device)
            if "layout" in d:
                lay = d["layout"]
                lay = lay[:, hs] if lay.shape[1] != len(hs) else lay
                total += float((lay * per[:, :nk]).sum())
            else:
                idx = d["idx"].long().clamp(max=nk)
                live = torch.arange(idx.shape[-1], device=idx.device) < d["cnt"].unsqueeze(-1)
                total += float((per.expand(*idx.shape[:2], -1, -1).gather(-1, idx) * live).sum())
        return total

    @torch.no_grad()
    def calibrate(self, samples, budget: float = 0.1, candidates=None) -> list[dict]:
        """Offline per-head pattern search (paper Sec. 3.2, Alg. 1, with recall of the attention
        mass as the score): for each head, the candidate (a pattern and its budgets) keeping the
        most causal attention mass, averaged over ``samples``, with a mean density at most
        ``budget``. samples: (q, k) pairs, q [B, H, T, D] and k [B, Hkv, T, D], that the caller
        supplies (scripts/minference_search.py builds them). The method then uses the chosen
        patterns (pattern ``searched``); returns them, each with its recall and density, for
        ``save_patterns``."""
        samples = [(q, k) for q, k in samples]
        if not samples:
            raise ValueError("MInference.calibrate: no samples")
        for q, k in samples:
            if q.dim() != 4 or k.dim() != 4 or q.shape[1] != self.num_heads or q.shape[2] != k.shape[2]:
                raise ValueError(f"MInference.calibrate: samples must be q [B, {self.num_heads}, T, D] and k "
                                 f"[B, Hkv, T, D], got {tuple(q.shape)} and {tuple(k.shape)}")
        H = self.num_heads
        candidates = default_candidates(samples[0][0].shape[2], self.block_size) if candidates is None else candidates
        score = torch.zeros(len(candidates), 2, H, dtype=torch.float64)  # recall, density
        for q, k in samples:
            B, _, T, D = q.shape
            causal = masks.materialize(masks.causal(0), 1, 1, T, T, q.device)
            exact = torch.softmax((q.float() @ repeat_kv(k, H // k.shape[1]).float().transpose(-1, -2)
                                   / math.sqrt(D)).masked_fill(~causal, float("-inf")), -1)
            for i, cand in enumerate(candidates):
                m = copy.copy(self)
                m.heads = [{**HEAD_KEYS, **cand}] * H
                mask = masks.materialize(m.mask_mod(q, k, True), B, H, T, T, q.device) & causal
                score[i, 0] += (exact * mask).sum(-1).mean((0, 2)).double().cpu() / len(samples)
                score[i, 1] += mask.float().sum((0, 2, 3)).double().cpu() / (B * masks.causal_pairs(T, T) * len(samples))
        heads = []
        for h in range(H):
            fits = [i for i in range(len(candidates)) if score[i, 1, h] <= budget]
            if not fits:
                raise ValueError(f"MInference.calibrate: no candidate pattern fits the budget {budget} for head {h}")
            best = max(fits, key=lambda i: float(score[i, 0, h]))
            heads.append({**HEAD_KEYS, **candidates[best], "recall": float(score[best, 0, h]),
                          "density": float(score[best, 1, h])})
        self.heads, self.pattern, self.static_mask = heads, "searched", all(h["pattern"] == "a_shape" for h in heads)
        return heads

    def cost(self, tq, tk, causal) -> Cost:
        """Budgeted density: the most pairs the budgets allow, averaged over heads (with the
        official ranges a loose bound: ``last_density`` is the construction's count)."""
        dense_pairs = masks.causal_pairs(tq, tk)
        pairs = 0.0
        for h in self.heads:
            if h["pattern"] == "a_shape":
                n = _ashape_pairs(tq, tk, h["num_sink"], h["window"])
            elif h["pattern"] == "vertical_slash":  # a row keeps at most its columns and a block of 64 a slash
                width = h["slash_size"] * (VS_BLOCK if self.slash_mode == "ranges" else 1)
                p = torch.arange(tk - tq, tk, dtype=torch.int64)
                n = int((p + 1).clamp(max=h["vertical_size"] + width).sum())
            else:
                n = min(dense_pairs, tq * h["top_k_blocks"] * self.block_size)
            pairs += n / len(self.heads)
        index = 0.0
        if any(h["pattern"] == "vertical_slash" for h in self.heads):
            index += 2.0 * min(self.last_q, tq) * tk * self.head_dim
        return Cost(flops=self.num_heads * (4.0 * pairs * self.head_dim + index),
                    density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)


def _top_per_head(score, n_per_head: list[int]):
    """[B, H, T] bool: each head's n_per_head[h] best entries, by one top-k of the largest
    budget for all heads (no loop over heads; the budgets are host integers: no sync)."""
    B, H, T = score.shape
    out = torch.zeros_like(score, dtype=torch.bool)
    width = min(max(n_per_head, default=0), T)
    if width:
        n = torch.tensor(n_per_head).clamp(max=T).view(1, H, 1).to(score.device, non_blocking=True)
        keep = torch.arange(width, device=score.device).view(1, 1, width) < n
        out.scatter_(-1, score.topk(width, dim=-1).indices, keep.expand(B, H, width))
    return out


def _pool(x, bs):
    """[B, H, T, D] -> [B, H, ceil(T / bs), D] block means, summed in fp32 (no fp32 copy of x);
    a last partial block is zero-padded and divided by bs, as the official block_sparse_kernel
    pads the context to whole blocks before its mean."""
    B, H, T, D = x.shape
    n = math.ceil(T / bs)
    if n * bs != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, n * bs - T))
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.reshape(B, H, n, bs, D).sum(3, dtype=dt) / bs


def _ashape_pairs(tq, tk, sink, window) -> int:
    p = torch.arange(tk - tq, tk, dtype=torch.int64)
    local = p.clamp(max=window - 1) + 1 if window > 0 else torch.zeros_like(p)
    return int((local + torch.minimum(torch.full_like(p, sink), p + 1 - local).clamp_min(0)).sum())


def _pairs_below(p0, p1, k0, k1):
    """#{(p, j): p0 <= p < p1, k0 <= j < k1, j <= p}, elementwise over int tensors: row p sees
    min(max(p + 1 - k0, 0), L) keys of the L = k1 - k0."""
    L = (k1 - k0).clamp_min(0)

    def upto(n):  # sum_{x = 1}^{n} min(x, L)
        n = n.clamp_min(0)
        m = torch.minimum(n, L)
        return m * (m + 1) // 2 + (n - m) * L

    return upto(p1 - k0) - upto(p0 - k0)


# ---- the official vertical-slash construction ----------------------------------------------
def slash_ranges(slash: torch.Tensor, block: int = VS_BLOCK, n: int | None = None):
    """``convert_vertical_slash_indexes`` (microsoft/MInference, csrc): per block row of
    ``block`` query positions [m0, m1), the slashes (offsets o = i - j, [B, H, T] bool) with
    o < m1 in decreasing order each give the range [s - block, s), s = max(m1 - o, block); a
    range starting more than ``block`` past the current one's end opens a new one, one past
    its end extends it by ``block``. Returns (starts [B, H, R, n]: the 64-wide blocks the
    ranges consist of, sorted, ``NONE`` where unused; end [B, H, R]: the last range's end, 0
    where none), R = ceil(T / block) block rows, n = the most slashes of a head (pass it when
    known, e.g. the slash budget: counting it is a host sync). On a GPU (or the CPU under
    TRITON_INTERPRET=1) one Triton program walks a head's slashes for a tile of block rows
    (``methods.kernels.slash_ranges``); otherwise the walk is a PyTorch loop over slashes."""
    from methods.kernels import slash_ranges as sr

    B, H, T = slash.shape
    R = math.ceil(T / block)
    dev = slash.device
    if n is None:
        n = int(slash.sum(-1).max()) if slash.numel() else 0
    n = min(n, T)
    offs = torch.where(slash, torch.arange(T, device=dev), -1).topk(n, dim=-1).values  # decreasing
    if n and sr.usable(slash) and (slash.is_cuda or KERNEL_SCAN_ON_CPU):
        starts, end = sr.slash_range_starts(offs, R, block, NONE)
        return starts.sort(-1).values, end
    m1 = (torch.arange(R, device=dev) + 1).view(1, 1, R, 1) * block
    s_all = (m1 - offs.unsqueeze(2)).clamp_min(block)  # [B, H, R, n]
    ok_all = (offs.unsqueeze(2) >= 0) & (offs.unsqueeze(2) < m1)
    started = torch.zeros(B, H, R, dtype=torch.bool, device=dev)
    end = torch.zeros(B, H, R, dtype=torch.long, device=dev)
    starts = torch.full((B, H, R, n), NONE, dtype=torch.long, device=dev)
    for t in range(n):  # the official loop, for every block row at once
        s, ok = s_all[..., t], ok_all[..., t]
        new = ok & (~started | (s > end + block))
        grow = ok & ~new & (s > end)
        starts[..., t] = torch.where(new, s - block, torch.where(grow, end, NONE))
        end = torch.where(new, s, torch.where(grow, end + block, end))
        started = started | ok
    return starts.sort(-1).values, end


KERNEL_SCAN_ON_CPU = False  # the interpreter is slower than the PyTorch loop: tests turn it on


def range_cover(starts: torch.Tensor, T: int, block: int = VS_BLOCK):
    """The ranges per key chunk of ``block`` columns: (a, b) [B, H, R, C] uint8, C = ceil(T /
    block): the columns of chunk c that the block row's ranges cover are [0, a) and [b, block)
    of it (blocks do not overlap, so at most one ends and one starts inside a chunk)."""
    B, H, R, _ = starts.shape
    C = math.ceil(T / block)
    valid = starts < NONE
    w = torch.where(valid, starts % block, 0).to(torch.uint8)
    c0 = torch.where(valid, starts // block, C)
    b = torch.full((B, H, R, C + 1), block, dtype=torch.uint8, device=starts.device)
    b.scatter_(-1, c0.clamp(max=C), torch.where(valid, w, torch.full_like(w, block)))
    a = torch.zeros(B, H, R, C + 2, dtype=torch.uint8, device=starts.device)
    a.scatter_(-1, torch.where(valid, c0 + 1, C + 1), w)
    return a[..., :C].contiguous(), b[..., :C].contiguous()


def _covered(index, cols):
    """[B, H, R, m] bool: whether columns ``cols`` [B, H, R, m] lie in the block row's ranges."""
    c = (cols // VS_BLOCK).clamp(max=index["cover_a"].shape[-1] - 1)
    w = cols % VS_BLOCK
    return (w < index["cover_a"].gather(-1, c).long()) | (w >= index["cover_b"].gather(-1, c).long())


def _vertical_columns(vert):
    """[B, H, nv] the vertical columns in increasing order, ``NONE`` after a head's last."""
    T = vert.shape[-1]
    cols = torch.where(vert, torch.arange(T, device=vert.device), NONE).sort(-1).values
    return cols[..., :max(1, int(vert.sum(-1).max()))]


def _row_bounds(R, tq, tk, device, r0=0):
    """Query positions [lo, hi) of block rows r0 .. r0 + R - 1 ([R] each; end-aligned queries)."""
    r = torch.arange(r0, r0 + R, device=device)
    return (r * VS_BLOCK).clamp_min(tk - tq), ((r + 1) * VS_BLOCK).clamp(max=tk)


def ranges_pairs(index, tq, tk) -> float:
    """Causal pairs kept by the ranges and the verticals outside them (below each block row's
    last range end), summed over batch and heads."""
    starts, end = index["starts"], index["end"]
    R = starts.shape[2]
    lo, hi = (x.view(1, 1, R, 1) for x in _row_bounds(R, tq, tk, starts.device))
    valid = starts < NONE
    st = torch.where(valid, starts, 0)
    n = (_pairs_below(lo, hi, st, (st + VS_BLOCK).clamp(max=tk)) * valid).sum()
    cols = _vertical_columns(index["vert"]).unsqueeze(2).expand(-1, -1, R, -1)
    keep = (cols < end.unsqueeze(-1)) & ~_covered(index, cols)
    n = n + (_pairs_below(lo, hi, cols, cols + 1) * keep).sum()
    return float(n)


def lines_pairs(index, tq, tk) -> float:
    """Causal pairs with a vertical column or a slash diagonal (exact lines), summed: per row
    p, verticals <= p plus slashes <= p less the pairs that are both (a convolution)."""
    vert, slash = index["vert"].double(), index["slash"].double()
    T = vert.shape[-1]
    p = torch.arange(tk - tq, tk, device=vert.device)
    cv, cs = vert.cumsum(-1), slash.cumsum(-1)
    f = torch.fft.rfft(vert, 2 * T) * torch.fft.rfft(slash, 2 * T)
    both = torch.fft.irfft(f, 2 * T)[..., :T].round()  # both[p] = sum_j vert[j] slash[p - j]
    return float((cv[..., p] + cs[..., p] - both[..., p]).sum())


def _range_lists(index, r0, r1, tq, tk):
    """The block-sparse kernel's lists for block rows r0 .. r1 - 1 (query tiles of 64): the
    16-wide key blocks wholly inside a range (idx16, cnt16), and the other covered columns
    (edges of the ranges not on the 16 grid) with the verticals outside the ranges (idx1, cnt1)."""
    starts, end = index["starts"][:, :, r0:r1], index["end"][:, :, r0:r1]
    R = starts.shape[2]
    dev = starts.device
    last = (_row_bounds(R, tq, tk, dev, r0)[1] - 1).view(1, 1, R, 1)  # a block row's last query
    valid = starts < NONE
    st = torch.where(valid, starts, 0)
    nxt = torch.cat([starts[..., 1:], torch.full_like(starts[..., :1], NONE)], -1)
    prv = torch.cat([torch.full_like(starts[..., :1], -NONE), starts[..., :-1]], -1)
    # each 16-block whose first column lies in a range block: full when the range goes on past it
    g = ((st + 15) // 16).unsqueeze(-1) + torch.arange(4, device=dev)  # [B, H, R, n, 4]
    full = valid.unsqueeze(-1) & ((16 * g + 16 <= (st + VS_BLOCK).unsqueeze(-1)) |
                                  (nxt == st + VS_BLOCK).unsqueeze(-1)) & (16 * g <= last.unsqueeze(-1))
    # the columns of the ranges' edges that no full 16-block holds: a range's first and last few
    t = torch.arange(15, device=dev)
    head_n = torch.where(valid & (prv + VS_BLOCK != st), 16 * ((st + 15) // 16) - st, 0)
    e = st + VS_BLOCK
    tail_n = torch.where(valid & (nxt != e), e % 16, 0)
    head = st.unsqueeze(-1) + t
    tail = (16 * (e // 16)).unsqueeze(-1) + t
    cols = torch.cat([head, tail], -1).flatten(-2)
    ok = torch.cat([t < head_n.unsqueeze(-1), t < tail_n.unsqueeze(-1)], -1).flatten(-2)
    vcols = _vertical_columns(index["vert"]).unsqueeze(2).expand(-1, -1, R, -1)
    sub = {key: index[key][:, :, r0:r1] for key in ("cover_a", "cover_b")}
    vok = (vcols < end.unsqueeze(-1)) & ~_covered(sub, vcols)
    cols, ok = torch.cat([cols, vcols], -1), torch.cat([ok, vok], -1) & (torch.cat([cols, vcols], -1) <= last)
    return _lists(g.flatten(-2), full.flatten(-2)), _lists(cols, ok)


def _lists(entries, ok):
    """(idx [..., m] int32 of the kept entries in increasing order, cnt [...] int32)."""
    cnt = ok.sum(-1, dtype=torch.int32)
    width = max(1, int(cnt.max()) if cnt.numel() else 1)
    idx = torch.where(ok, entries, NONE).sort(-1).values[..., :width]
    return torch.where(idx < NONE, idx, 0).to(torch.int32).contiguous(), cnt.contiguous()


range_rows_bytes = 1 << 28  # the Triton ranges path: list candidates built at once (block rows chunked)


def ranges_attention(q, k, v, index):
    """The official construction on the existing kernels (Tq == Tk): per chunk of block rows,
    the block-sparse kernel over the 16-wide key blocks inside the ranges and again over single
    columns (the ranges' edges off the 16 grid, and the verticals), the two merged by their
    log-sum-exp. Returns (out, pairs computed)."""
    from methods.kernels import block_sparse as bsk

    B, H, T, _ = q.shape
    R, n = index["starts"].shape[2:]
    nv = _vertical_columns(index["vert"]).shape[-1]
    rows = max(1, range_rows_bytes // (8 * B * H * (34 * n + nv)))
    out, work = torch.empty_like(q), 0.0
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        t0, t1 = r0 * VS_BLOCK, min(r1 * VS_BLOCK, T)
        (i16, c16), (i1, c1) = _range_lists(index, r0, r1, T, T)
        qc, kc, vc = q[:, :, t0:t1], k[:, :, :t1], v[:, :, :t1]
        lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp64: the interpreter's tests
        lse16, lse1 = (torch.empty(B, H, t1 - t0, dtype=lse_dt, device=q.device) for _ in range(2))
        o16 = bsk.block_sparse_attention(qc, kc, vc, i16, c16, block_m=VS_BLOCK, block_n=16, causal=True, lse=lse16)
        o1 = bsk.block_sparse_attention(qc, kc, vc, i1, c1, block_m=VS_BLOCK, block_n=1, causal=True, lse=lse1)
        out[:, :, t0:t1] = _merge_by_lse(o16, lse16, o1, lse1)
        work += bsk.tile_work(c16, VS_BLOCK, 16, B, H) + bsk.tile_work(c1, VS_BLOCK, 16, B, H)  # a column: a tile of 16
    return out, work


def _merge_by_lse(o1, l1, o2, l2):
    """Softmax attention over the union of two disjoint key sets from each one's output and
    base-2 log-sum-exp (+inf: the set was empty for that row)."""
    l1, l2 = (torch.where(torch.isinf(x), -math.inf, x) for x in (l1, l2))
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isinf(m), 0.0, m)
    w1, w2 = torch.exp2(l1 - m), torch.exp2(l2 - m)
    tot = (w1 + w2).clamp_min(1e-30)
    dt = torch.promote_types(o1.dtype, l1.dtype)
    return (o1.to(dt) * (w1 / tot).unsqueeze(-1) + o2.to(dt) * (w2 / tot).unsqueeze(-1)).to(o1.dtype)


# ---- per-head pattern calibration ---------------------------------------------------------
def default_candidates(T: int, block_size: int = 64) -> list[dict]:
    """Candidate patterns and budgets, sized as fractions of the calibration length (the
    vertical-slash budgets small: with the official 64-wide ranges a slash costs a block a row)."""
    frac = lambda f: max(1, int(T * f))  # noqa: E731
    nb = max(1, T // block_size)
    vs = [dict(pattern="vertical_slash", vertical_size=frac(v), slash_size=frac(s), forced_sink=min(30, frac(v)),
               forced_local=min(100, max(1, frac(s) // 4)))
          for v in (1 / 64, 1 / 16, 1 / 8) for s in (1 / 512, 1 / 256, 1 / 128, 1 / 64)]
    return (
        [dict(pattern="a_shape", num_sink=frac(1 / 256), window=frac(f)) for f in (1 / 32, 1 / 16, 1 / 8, 1 / 4)]
        + vs
        + [dict(pattern="block_sparse", top_k_blocks=max(1, int(nb * f))) for f in (1 / 32, 1 / 16, 1 / 8, 1 / 4)]
    )


def save_patterns(path, heads: list[dict], **meta) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"version": 1, "num_heads": len(heads), **meta, "heads": heads}, indent=1))


def load_patterns(path, num_heads: int) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"MInference pattern file {path} does not exist; write one with "
                                f"`python scripts/minference_search.py --out {path}`")
    data = json.loads(p.read_text())
    heads = data.get("heads", [])
    if len(heads) != num_heads:
        raise ValueError(f"pattern file {path} has {len(heads)} heads, the model has {num_heads}")
    for h in heads:
        if h.get("pattern") not in PATTERNS:
            raise ValueError(f"pattern file {path}: unknown pattern {h.get('pattern')!r}")
    return [{**HEAD_KEYS, **h} for h in heads]
