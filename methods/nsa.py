"""NSA-style Native Sparse Attention: compressed, selected and sliding-window branches.

Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse
Attention" (2025), Sec. 3.3 (Eq. 5-12). Causal only.

compressed  blocks of ``compress_block`` keys taken every ``compress_stride`` tokens are
            compressed to one key and one value each by a learned MLP (with an intra-block
            position embedding); query t attends to the blocks that end at or before t.
            (Eq. 7-8; ``compress``, ``_compressed``).
selected    the compressed attention probabilities (Eq. 8) are summed over the compressed
            blocks overlapping each selection block of ``block_size`` keys, each weighted by
            the overlap (Eq. 9, ``block_importance``), and over the heads of a GQA group
            (Eq. 10); the ``num_selected`` best blocks visible to the query are kept (Eq. 11,
            ``select``), the first block and the two local blocks always among them; the
            query attends to their tokens (causally; Eq. 12).
window      the ``window`` most recent keys (Sec. 3.3.3).
out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, gates = sigmoid(Linear(q)) per head (Eq. 5).
Padding (key_padding_mask; the paper has none): padded keys are masked in the selected and window
branches, and a compressed block holding any padded key is left out of the compressed branch (and
of the selection's importance); a branch with nothing visible gives zeros.

Eq. 9, as we read the paper: p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[l'/d * j - m - n]
(l = compress_block, d = compress_stride, l' = block_size): each compressed block counts once
per pair (m, n), e.g. weights 1, 2, 2, 2, 1 for l'=64, l=32, d=16. We implement it as the
overlap of token ranges: compressed block i (tokens i*d .. i*d + l - 1) adds its probability
to selection block j (tokens j*l' .. (j+1)*l' - 1) times (tokens they share) / d. That gives
the same weights (the pair counts) but puts them on the compressed blocks that cover the
selection block's tokens; the paper's literal indices would shift each window l' - d tokens
earlier, onto the previous selection block, which contradicts the equation's purpose (scores of
the blocks that share the selection block's tokens). Where d divides neither l nor l' the
weights are fractional. With d = l and l' a multiple of l every weight is 0 or 1.

impl=reference materialises each branch's mask (exact, dense work); impl=flex runs the
selected and window branches with FlexAttention block masks; impl=triton runs all three with the
kernels of ``methods.kernels`` (``nsa_compressed``: the compressed attention with its log-sum-exp,
then the selection-block importance recomputed from it (by row chunks of at most
``importance_bytes``; no [T, T/stride] tensor in memory) and each row's top-n in one kernel
(``nsa_topn``); ``nsa_selected``: the selection (one program per token serves all query heads of a GQA group,
as in the paper; for groups of up to 4 heads one program per key block and the tokens that
chose it, FSA's order, then a merge per token); ``block_sparse``: the window; ``nsa_gate``: the
gated sum in one pass).
The reference and flex paths compute the compressed branch in PyTorch, in chunks of queries.
Training with impl=triton: each branch has a backward kernel (``NSACompressedAttention``;
``NSASelectedAttention``: dK and dV, and for small groups dQ, by key block over the tokens that
chose it; ``BlockSparseAttention`` for the window), the
compression MLP and the gates by autograd. Among blocks of equal importance the earlier is
chosen (on every path).
The index step is the compressed branch with the importance and top-n selection it yields
(one pass: o_cmp comes with it), timed into ``last_index_ms`` under
``methods.base.index_timing(True)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from methods import masks
from methods.base import (
    AttentionInputError,
    Cost,
    SparseMethod,
    check_int,
    masked_attention,
    repeat_kv,
    timed_index,
)
from methods.decode import KVCache, Selection, _Adapter


class NSA(SparseMethod):
    name = "nsa"
    # what the README's method table says (python -m analysis.readme)
    paper = "Yuan et al. 2025"
    kind = "sparse (trainable)"
    official_test = "tests/test_nsa_importance.py::test_reference_importance_is_eq9"  # the paper (no official code)
    has_index = True  # the compressed branch and the selection, under index_timing
    importance_bytes = 1 << 30  # Triton path: selection scores held at once (rows chunked to fit)
    impls = ("reference", "flex", "triton")
    supports_noncausal = False
    trainable = True
    training_free = False
    triton_backward = True  # training through backward kernels for all three branches
    fixed_head_dim = True  # the compression MLP and the gates are sized by head_dim

    def __init__(self, block_size: int = 64, num_selected: int = 16, window: int = 512,
                 compress_block: int = 32, compress_stride: int = 16, query_chunk: int = 4096,
                 impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        for name, value in (("block_size", block_size), ("num_selected", num_selected), ("window", window),
                            ("compress_block", compress_block), ("compress_stride", compress_stride),
                            ("query_chunk", query_chunk)):
            check_int("NSA", name, value)
        if compress_stride > compress_block:
            raise ValueError("NSA: compress_stride must not exceed compress_block (blocks would skip keys)")
        self.block_size, self.num_selected, self.window = block_size, num_selected, window
        self.compress_block, self.compress_stride, self.query_chunk = compress_block, compress_stride, query_chunk
        D, l = self.head_dim, compress_block
        self.pos_k = nn.Parameter(torch.zeros(l, D))
        self.pos_v = nn.Parameter(torch.zeros(l, D))
        self.comp_k = nn.Linear(l * D, D, bias=False)
        self.comp_v = nn.Linear(l * D, D, bias=False)
        with torch.no_grad():  # start as block means (the MLP then learns from there)
            mean = torch.eye(D).repeat(1, l) / l  # [D, l*D]
            self.comp_k.weight.copy_(mean)
            self.comp_v.weight.copy_(mean)
        self.gate = nn.Linear(D, 3)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def hyperparameters(self) -> dict:
        return {"block_size": self.block_size, "num_selected": self.num_selected, "window": self.window,
                "compress_block": self.compress_block, "compress_stride": self.compress_stride}

    # ---- compressed branch ------------------------------------------------------------------
    def compress(self, x, pos, lin):
        """[B, Hkv, T, D] -> [B, Hkv, n_cmp, D]: one vector per block (stride d, length l)."""
        l, d = self.compress_block, self.compress_stride
        T = x.shape[2]
        if T < l:
            return x.new_zeros(*x.shape[:2], 0, x.shape[-1])
        blocks = x.unfold(2, l, d).transpose(-1, -2)  # [B, Hkv, n, l, D]
        blocks = blocks + pos.to(x.dtype)
        return blocks.flatten(-2) @ lin.weight.to(x.dtype).T  # [B, Hkv, n, D]

    def compressed_kv(self, k, v):
        """The compressed keys and values [B, Hkv, n, D], in fp32 (fp64 for fp64 inputs)."""
        dt = torch.float64 if k.dtype == torch.float64 else torch.float32
        return (self.compress(k.to(dt), self.pos_k, self.comp_k),
                self.compress(v.to(dt), self.pos_v, self.comp_v))

    def _compressed(self, q, k, v, key_padding_mask=None):
        """o_cmp and the selected blocks, from the selection-block importance (summed over each
        GQA group), chunked over queries so that memory stays O(chunk x T / stride). A compressed
        block holding a padded key is left out; a query with no visible block gets zeros."""
        B, H, T, D = q.shape
        Hkv, rep = k.shape[1], H // k.shape[1]
        l, d, bs = self.compress_block, self.compress_stride, self.block_size
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        kc, vc = (repeat_kv(x, rep) for x in self.compressed_kv(k, v))  # [B, H, n, D]
        n, nsel = kc.shape[2], math.ceil(T / bs)
        mt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else dt  # the two big products
        kc_s, vc_m = kc.to(mt).to(dt), vc.to(mt)  # scores: half-precision keys, summed in fp32
        ends = torch.arange(n, device=q.device) * d + l - 1  # last key of each compressed block
        live = None  # [B, 1, 1, n]: compressed blocks of real keys only
        if key_padding_mask is not None and n:
            live = key_padding_mask.unfold(1, l, d).all(-1)[:, None, None, :n]
        outs, imps = [], []
        for a in range(0, T, self.query_chunk):
            b = min(a + self.query_chunk, T)
            t = torch.arange(a, b, device=q.device).view(-1, 1)
            # scores of the half-precision operands, summed in fp32 (as the Triton path does)
            s = (q[:, :, a:b].to(dt) @ kc_s.transpose(-1, -2)) / math.sqrt(D)  # [B, H, c, n]
            seen = ends.view(1, n) <= t  # [c, n]: blocks that end at or before the query
            if live is not None:
                seen = seen & live  # [B, 1, c, n]
            p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1)
            p = p.masked_fill(~seen.any(-1, keepdim=True), 0.0)  # no visible block: zeros (only there)
            outs.append((p.to(mt) @ vc_m).to(dt))
            grp = p.view(B, Hkv, rep, b - a, n).sum(2)  # [B, Hkv, c, n]: shared by the group
            imps.append(self.select(self.block_importance(grp, nsel), a))  # [B, Hkv, c, n]
        return torch.cat(outs, 2), torch.cat(imps, 2)

    def block_importance(self, p, nsel: int):
        """Eq. 9: compressed-block probabilities p [..., n] -> selection-block importance
        [..., nsel]: block i adds p_i times the tokens it shares with selection block j, over the
        stride d (the overlap of token ranges; the module docstring says why)."""
        l, d, bs = self.compress_block, self.compress_stride, self.block_size
        n = p.shape[-1]
        start = torch.arange(n, device=p.device) * d  # first token of each compressed block
        first, last = start // bs, (start + l - 1) // bs  # the selection blocks it overlaps
        # the most selection blocks one compressed block overlaps, from the config on the host
        # (no read-back: a decode step replays from a CUDA graph): the overlap depends only on
        # its start i * d modulo bs, which repeats within bs blocks
        span = max(((i * d + l - 1) // bs - (i * d) // bs for i in range(min(n, bs))), default=-1) + 1
        imp = p.new_zeros(*p.shape[:-1], nsel + 1)  # column nsel: where the overlaps past a block's end go
        for o in range(span):
            j = first + o
            hit = j <= last
            shared = torch.minimum(start + l, (j + 1) * bs) - torch.maximum(start, j * bs)
            w = torch.where(hit, shared / d, 0.0).to(p.dtype)  # masks, not x[mask]: static shapes
            imp.index_add_(-1, torch.where(hit, j, nsel), p * w)
        return imp[..., :nsel]

    def select(self, importance, t0: int = 0):
        """[B, Hkv, c, nsel] importance of queries t0 .. t0 + c - 1 -> their chosen blocks:
        [B, Hkv, c, n] block indices (-1 where fewer than n blocks are visible). Overwrites
        ``importance`` (its callers' temporaries: a copy would double the largest tensor)."""
        bs = self.block_size
        c, nsel = importance.shape[-2:]
        t = torch.arange(t0, t0 + c, device=importance.device).view(c, 1)
        j = torch.arange(nsel, device=importance.device).view(1, nsel)
        cur = t // bs
        forced = (j == 0) | (j == cur) | (j == cur - 1)
        score = importance.masked_fill_(forced, float("inf")).masked_fill_(j > cur, float("-inf"))  # in place
        # best first, ties to the earlier block (a stable sort: the fused top-n kernel's order)
        top = score.sort(dim=-1, descending=True, stable=True).indices[..., :min(self.num_selected, nsel)]
        return torch.where(top <= cur, top, -1)

    @staticmethod
    def chosen_mask(sel, nsel):
        """[B, Hkv, T, n] block indices -> [B, Hkv, T, nsel] bool."""
        dump = torch.where(sel < 0, nsel, sel)  # -1 goes to an extra column, dropped
        out = torch.zeros(*sel.shape[:-1], nsel + 1, dtype=torch.bool, device=sel.device)
        return out.scatter_(-1, dump, True)[..., :nsel]

    @staticmethod
    def chosen_bits(sel, nsel):
        """[B, Hkv, T, n] block indices -> [B, Hkv, T, ceil(nsel / 8)] uint8, bit j % 8 of byte
        j // 8 set where block j is chosen: the selected-branch mask of the flex path, 8x smaller
        than ``chosen_mask`` and under 2^31 elements at 128k (FlexAttention's compiled mask
        indexes captured tensors with 32-bit offsets: an [B, H, 128k, 2048] bool overflows them)."""
        words = (nsel + 7) // 8
        word = torch.where(sel < 0, words, torch.div(sel, 8, rounding_mode="floor"))  # -1: an extra byte, dropped
        bit = torch.where(sel < 0, 0, torch.bitwise_left_shift(1, sel.remainder(8))).to(torch.uint8)
        out = torch.zeros(*sel.shape[:-1], words + 1, dtype=torch.uint8, device=sel.device)
        return out.scatter_add_(-1, word, bit)[..., :words]  # distinct blocks per row: add == or

    def _triton_branches(self, q, k, v, causal, key_padding_mask):
        """All three branches through Triton kernels: the compressed attention and the
        selection-block importance, the selected blocks, the window. Returns (out, pairs)."""
        from methods.kernels import block_sparse, nsa_gate, nsa_selected

        if key_padding_mask is not None:
            return None  # padded batches: the flex path
        B, H, T, D = q.shape
        training = self._wants_grad(q, k, v)
        with timed_index(self, q):  # the compressed branch and the selection
            o_cmp, sel = self._triton_compressed(q, k, v)
        o_slc = nsa_selected.nsa_selected_attention(q, k, v, sel, self.block_size)
        tiles = block_sparse.tiles_for(D, T, q.dtype, True, window=self.window, grad=training)
        self.last_kernel_config["window"] = tiles
        bm, bn = tiles["block_m"], tiles["block_n"]
        idx, cnt, nin = block_sparse.window_lists(T, bm, bn, True, (self.window,), (block_sparse.BIG,), (0,),
                                                  str(q.device))
        o_win = block_sparse.block_sparse_attention(q, k, v, idx, cnt, nin=nin, block_m=bm, block_n=bn, causal=True,
                                                    win_l=torch.tensor([self.window]), num_warps=tiles["num_warps"],
                                                    num_stages=tiles["num_stages"])
        rep = H // k.shape[1]
        work = float((sel >= 0).sum()) * self.block_size * rep + block_sparse.tile_work(cnt, bm, bn, B, H)
        if training or q.dtype == torch.float64:  # autograd (in fp32); the interpreter's fp64 tests
            return self._combine(q, o_cmp.to(torch.float64 if q.dtype == torch.float64 else torch.float32),
                                 o_slc, o_win), work
        return nsa_gate.gate_combine(self._gates(q), o_cmp, o_slc, o_win, q.dtype), work  # one pass

    def _triton_compressed(self, q, k, v):
        """o_cmp and the selected blocks [B, Hkv, T, n] through the kernels: the compressed
        attention and its log-sum-exp (with a backward kernel where gradients are on, through
        to the compression MLP), then the importance and the top-n by row chunks (a [rows,
        T / block] score per KV head at a time; no gradient: indices)."""
        from methods.kernels import nsa_compressed

        B, H, T, D = q.shape
        kc, vc = (x.to(q.dtype) for x in self.compressed_kv(k, v))  # [B, Hkv, n, D]
        cb, cs = self.compress_block, self.compress_stride
        o_cmp, lse = nsa_compressed.nsa_compressed_attention(q, kc, vc, cb, cs)
        q, kc = q.detach(), kc.detach()
        nsel = math.ceil(T / self.block_size)
        rows = max(64, (self.importance_bytes // (4 * B * k.shape[1] * nsel)) // 64 * 64)

        def top(imp, a):  # the fused top-n where a row fits on chip, else PyTorch's
            sel = nsa_compressed.nsa_topn(imp, a, self.block_size, self.num_selected)
            return self.select(imp, a) if sel is None else sel

        sel = torch.cat([top(nsa_compressed.nsa_importance(q, kc, lse, self.block_size, cb, cs, a, min(a + rows, T)),
                             a) for a in range(0, T, rows)], 2)  # [B, Hkv, T, n]
        return o_cmp, sel

    # ---- the three branches -------------------------------------------------------------------
    def check_inputs(self, q, k, v, causal, key_padding_mask) -> None:
        super().check_inputs(q, k, v, causal, key_padding_mask)
        if q.shape[2] != k.shape[2]:
            raise AttentionInputError(
                f"NSA: queries and keys must have the same length (prefill/training), got Tq={q.shape[2]}, "
                f"Tk={k.shape[2]}")

    def attend(self, q, k, v, causal, key_padding_mask):
        B, H, T, D = q.shape
        rep = H // k.shape[1]
        out = self._try_triton(q, k, v, causal, key_padding_mask, attend=self._triton_branches)
        if out is not None:
            return out
        with timed_index(self, q):  # the compressed branch and the selection
            o_cmp, sel = self._compressed(q, k, v, key_padding_mask)  # sel: [B, Hkv, T, n]
        chosen = self.chosen_bits(sel, math.ceil(T / self.block_size))  # [B, Hkv, T, nsel / 8]
        bs, w = self.block_size, self.window

        def selected_mask(b, h, q_idx, kv_idx):
            blk = kv_idx // bs
            byte = chosen[b, h // rep, q_idx, blk // 8].to(torch.int32)
            return ((byte >> (blk % 8)) & 1 != 0) & (kv_idx <= q_idx)

        def window_mask(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx < w) & (kv_idx <= q_idx)

        mods = [selected_mask, window_mask]
        if key_padding_mask is not None:
            mods = [masks.and_masks(m, masks.key_padding(key_padding_mask)) for m in mods]
        pairs = float(B * H * masks.causal_pairs(T, T))
        from methods.kernels import flex

        self.last_path = "reference" if self.impl == "reference" or not flex.usable(q, k, v) else "flex"
        if self.last_path == "reference":
            self._compiled = False
            ms = [masks.materialize(m, B, H, T, T, q.device) for m in mods]
            o_slc, o_win = (masked_attention(q, k, v, m) for m in ms)
            self.last_density = float(ms[0].sum() + ms[1].sum()) / pairs
        else:
            bms = [flex.block_mask(m, B, H, T, T, q.device, self.flex_block_size) for m in mods] \
                if key_padding_mask is not None else self._flex_block_masks(chosen, mods, T, rep)
            (o_slc, c1), (o_win, c2) = (flex.attention(q, k, v, bm) for bm in bms)
            self._compiled = c1 and c2
            self.last_density = sum(flex.block_density(bm, pairs, B, H) for bm in bms)
        return self._combine(q, o_cmp, o_slc, o_win)

    def _flex_block_masks(self, chosen, mods, T, rep):
        """The BlockMasks of the selected and window branches from their blocks (no mask
        function on every element): a key block touched where any query of the block chose
        it (chosen [B, Hkv, T, nsel], ``flex.coarsen``), wholly kept where all did; the window
        a band (``flex.band``). Selection blocks that do not divide FlexAttention's blocks
        fall back to ``create_block_mask``."""
        from methods.kernels import flex

        blk, B = self.flex_block_size, chosen.shape[0]
        H = chosen.shape[1] * rep
        sel = flex.coarsen(chosen, 1, self.block_size, blk, T, T)
        self.last_flex_build = "create_block_mask" if sel is None else "from_kv_blocks"
        if sel is None:
            return [flex.block_mask(m, B, H, T, T, chosen.device, blk) for m in mods]
        sel = [x.repeat_interleave(rep, 1) for x in sel]
        win = flex.band(T, T, blk, 0, self.window - 1, chosen.device)
        return [flex.from_layout(*flex.clip(*lay, T, T, blk, True), m, T, T, blk) for lay, m in zip((sel, win), mods)]

    def _gates(self, q):
        return torch.sigmoid(self.gate(q.to(self.gate.weight.dtype)))  # [B, H, T, 3]

    def _combine(self, q, o_cmp, o_slc, o_win):
        g = self._gates(q).to(o_cmp.dtype)
        out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc.to(o_cmp.dtype) + g[..., 2:3] * o_win.to(o_cmp.dtype)
        return out.to(q.dtype)

    def computed_keys(self, q, k, causal: bool):
        """Not reported yet: the keys NSA attends exactly are its selected blocks and window,
        chosen from the compressed branch per GQA group (attention recall: None, not a crash)."""
        return None

    def decode_adapter(self) -> NSADecode:
        """The decode path over a KV cache (``methods.decode``): the three branches per step."""
        return NSADecode(self)

    def cost(self, tq, tk, causal) -> Cost:
        """Budgeted: selected blocks plus window per query (at most all visible keys), plus the
        compressed branch, against causal dense attention."""
        bs, n_sel, w = self.block_size, self.num_selected, self.window
        pairs = 0
        for t in range(tk - tq, tk):
            vis = t + 1
            pairs += min(vis, n_sel * bs) + min(vis, w)
        n_cmp = max(0, (tk - self.compress_block) // self.compress_stride + 1)
        cmp_pairs = tq * n_cmp / 2  # about half the compressed blocks are visible on average
        dense_pairs = masks.causal_pairs(tq, tk)
        flops = 4.0 * self.num_heads * self.head_dim * (pairs + cmp_pairs)
        return Cost(flops=flops, density=(pairs + cmp_pairs) / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)


class NSADecode(_Adapter):
    """NSA's decode path (Sec. 3.3 at decode time; the paper's kernels serve training and
    prefill, its decode reads the same three branches): the cache keeps every key and value
    (a later query may select any block) and, as its index, the compressed keys and values of
    every complete compression block (``cmp_k``, ``cmp_v`` [B, Hkv, blocks, D], fp32): the
    prefill compresses the blocks it holds, and a step that completes a block (its last key at
    position i*d + l - 1) compresses it (Eq. 7). At position t, with q_t:

      select  the compressed attention over the blocks so far (Eq. 8), its probabilities summed
              over the GQA group (Eq. 10) and mapped to selection-block importance (Eq. 9,
              ``NSA.block_importance``), the top ``num_selected`` blocks with the first and two
              local ones forced (Eq. 11, ``NSA.select``)
      attend  exact attention over the selected blocks' keys up to t (Eq. 12) and over the
              ``window`` most recent keys, gated with the compressed output (Eq. 5)

    so that the step's output equals the prefill's row t. Bytes read: the compressed keys and
    values (index), and the K/V rows of the selected blocks and the window (each row once).
    ``select`` and ``attend_selected`` read nothing back to the host (sizes from the config and
    ``cache.length``, masks instead of ``x[mask]``): ``runner=decode`` can replay them from a
    CUDA graph (tests/test_decode_sync.py)."""

    def decode_params(self) -> dict:
        return self.method.hyperparameters()

    def blocks(self, length: int) -> int:
        """Complete compression blocks among ``length`` keys."""
        l, d = self.method.compress_block, self.method.compress_stride
        return 0 if length < l else (length - l) // d + 1

    def build_index(self, cache: KVCache) -> None:
        B, Hkv, C, D = cache.k.shape
        dt = torch.float64 if cache.dtype == torch.float64 else torch.float32
        for name in ("cmp_k", "cmp_v"):
            cache.aux[name] = torch.zeros(B, Hkv, self.blocks(C), D, dtype=dt, device=cache.device)
        n = self.blocks(cache.length)
        if n:
            kc, vc = self.method.compressed_kv(cache.keys(), cache.values())
            cache.aux["cmp_k"][:, :, :n], cache.aux["cmp_v"][:, :, :n] = kc, vc

    def update_index(self, cache: KVCache, k_t, v_t) -> None:
        S, l, d = cache.length, self.method.compress_block, self.method.compress_stride
        if S >= l and (S - l) % d == 0:  # the step completed compression block (S - l) / d
            kc, vc = self.method.compressed_kv(cache.k[:, :, S - l:S], cache.v[:, :, S - l:S])
            i = (S - l) // d
            cache.aux["cmp_k"][:, :, i], cache.aux["cmp_v"][:, :, i] = kc[:, :, 0], vc[:, :, 0]

    def select(self, q_t, cache: KVCache) -> Selection:
        self._check_q(q_t, cache)
        m = self.method
        B, H, _, D = q_t.shape
        Hkv, rep = cache.num_kv_heads, H // cache.num_kv_heads
        t, bs, w = cache.length - 1, m.block_size, m.window  # every token is kept: slot = position
        n, nsel = self.blocks(cache.length), t // bs + 1
        dt = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        mt = q_t.dtype if q_t.dtype in (torch.float16, torch.bfloat16) else dt  # as the prefill rounds
        kc = repeat_kv(cache.aux["cmp_k"][:, :, :n], rep).to(mt).to(dt)
        vc = repeat_kv(cache.aux["cmp_v"][:, :, :n], rep).to(mt)
        if n:  # the compressed branch: every complete block ends at or before t
            p = torch.softmax((q_t.to(dt) @ kc.transpose(-1, -2)) / math.sqrt(D), -1)  # [B, H, 1, n]
            o_cmp = (p.to(mt) @ vc).to(dt)
        else:
            p, o_cmp = q_t.new_zeros(B, H, 1, 0, dtype=dt), q_t.new_zeros(B, H, 1, D, dtype=dt)
        imp = m.block_importance(p.view(B, Hkv, rep, 1, n).sum(2), nsel)  # [B, Hkv, 1, nsel]
        top = m.select(imp, t)[:, :, 0]  # [B, Hkv, k]: block indices, -1 where none
        ar = torch.arange(bs, device=q_t.device)
        slc = (top.clamp_min(0).unsqueeze(-1) * bs + ar).clamp_max(t).flatten(-2)  # [B, Hkv, k * bs]
        slc_ok = ((top >= 0).unsqueeze(-1) & (top.unsqueeze(-1) * bs + ar <= t)).flatten(-2)
        win = torch.arange(max(0, t - w + 1), t + 1, device=q_t.device).expand(B, Hkv, -1)
        chosen = m.chosen_mask(top.unsqueeze(2), nsel)[:, :, 0]  # [B, Hkv, nsel]
        win_new = ~chosen.gather(-1, win // bs)  # window keys not already read by the selection
        slots = torch.cat([slc, win], -1).repeat_interleave(rep, 1)  # [B, H, k * bs + w]
        valid = torch.cat([slc_ok, win_new], -1).repeat_interleave(rep, 1)
        index_bytes = 2.0 * B * Hkv * n * D * cache.aux["cmp_k"].element_size()
        return Selection(slots=slots, valid=valid, index_bytes=index_bytes,
                         extra={"o_cmp": o_cmp, "slc": slc, "slc_ok": slc_ok, "win": win[0, 0]})

    def attend_selected(self, q_t, cache: KVCache, sel: Selection) -> torch.Tensor:
        x = sel.extra
        k, v = cache.keys(), cache.values()
        gather = lambda t: t.gather(2, x["slc"].unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))  # noqa: E731
        o_slc = masked_attention(q_t, gather(k), gather(v), x["slc_ok"].repeat_interleave(
            self.num_heads // cache.num_kv_heads, 1).unsqueeze(2))
        o_win = masked_attention(q_t, k[:, :, x["win"]], v[:, :, x["win"]])
        return self.method._combine(q_t, x["o_cmp"], o_slc, o_win)
