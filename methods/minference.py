"""MInference-style training-free sparse prefill: A-shape, vertical-slash, block-sparse.

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention" (NeurIPS 2024), Sec. 3 and Alg. 1-3. Causal (prefill) only.

a_shape         the first ``num_sink`` keys plus a local window of ``window`` keys
vertical_slash  the indices are estimated online from the last ``last_q`` queries: their
                causal attention is summed per key column (verticals) and per diagonal
                (slashes); the ``vertical_size`` top columns and ``slash_size`` top
                diagonals are kept, the first ``num_sink`` columns and the ``window``
                nearest diagonals always among them (as MInference forces its first
                columns and last diagonals)
block_sparse    q and k are mean-pooled over blocks of ``block_size``; each query block keeps
                its ``top_k_blocks`` best key blocks (itself always among them)
searched        each head uses the pattern and budget stored for it in ``pattern_file``,
                written by the offline search below (``search_patterns``)

The offline search takes calibration q, k and, for each head, picks among candidate
patterns and budgets the one that keeps the most attention mass with a density within the
budget. Decode steps (one query) fall back to dense attention: ``last_fallback`` says so.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from methods import masks
from methods.base import Cost, SparseMethod, masked_attention, repeat_kv

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
A, VS, BS = range(3)


class MInference(SparseMethod):
    name = "minference"
    # what the README's method table says (python -m analysis.readme)
    paper = "Jiang et al. 2024"
    kind = "sparse (data-dependent), training-free"
    official_test = None
    supports_noncausal = False
    training_free = True

    impls = ("reference", "flex", "triton")

    def __init__(self, pattern: str = "vertical_slash", num_sink: int = 64, window: int = 512,
                 vertical_size: int = 256, slash_size: int = 512, block_size: int = 64,
                 top_k_blocks: int = 16, last_q: int = 64, pattern_file: str | None = None,
                 impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        if pattern not in (*PATTERNS, "searched"):
            raise ValueError(f"MInference: pattern must be one of {[*PATTERNS, 'searched']}, got {pattern!r}")
        self.pattern = pattern
        H = self.num_heads
        heads = [dict(pattern=pattern, num_sink=num_sink, window=window, vertical_size=vertical_size,
                      slash_size=slash_size, top_k_blocks=top_k_blocks)] * H
        if pattern == "searched":
            if not pattern_file:
                raise ValueError("MInference: pattern=searched needs pattern_file (see search_patterns)")
            heads = load_patterns(pattern_file, H)
        self.heads = heads
        self.static_mask = all(h["pattern"] == "a_shape" for h in heads)  # no index building
        self.block_size, self.last_q = block_size, last_q
        self.last_fallback: str | None = None

    def hyperparameters(self) -> dict:
        return {"pattern": self.pattern, "heads": self.heads, "block_size": self.block_size,
                "last_q": self.last_q}

    def _per_head(self, key, device):
        return torch.tensor([h.get(key, 0) for h in self.heads], device=device)

    # ---- index building -----------------------------------------------------------------
    def vertical_slash_sets(self, q, k):
        """[B, H, Tk] bool verticals (by key index) and slashes (by offset i - j)."""
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
        sink, win = self._per_head("num_sink", q.device), self._per_head("window", q.device)
        ar = torch.arange(tk, device=q.device).view(1, 1, tk)
        vert = vert.masked_fill(ar < sink.view(1, H, 1), float("inf"))
        slash = slash.masked_fill(ar < win.view(1, H, 1), float("inf"))
        nv, ns = self._per_head("vertical_size", q.device), self._per_head("slash_size", q.device)
        return _top_per_head(vert, nv), _top_per_head(slash, ns)

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
            s = s.masked_fill(kb > qb, float("-inf")).masked_fill(kb == qb, float("inf"))
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
        isv = iss = lay = None
        if "vertical_slash" in kinds:
            isv, iss = self.vertical_slash_sets(q, k)
        if "block_sparse" in kinds:
            lay = self.block_layout(q, k)
        nqb = math.ceil(q.shape[2] / bs)
        nkb = math.ceil(k.shape[2] / bs)

        def minference_mask(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            out = (pid[h] == A) & ((kv_idx < sink[h]) | (d < win[h]))
            if isv is not None:
                dd = d.clamp(0, k.shape[2] - 1)
                out = out | ((pid[h] == VS) & (isv[b, h, kv_idx] | iss[b, h, dd]))
            if lay is not None:
                qb = (q_idx + off) // bs - (nkb - nqb)
                out = out | ((pid[h] == BS) & lay[b, h, qb, kv_idx // bs])
            return out

        return minference_mask

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
                bm, bn = 64, 64
                win = tuple(h["window"] for h in heads)
                sink = tuple(h["num_sink"] for h in heads)
                idx, cnt, nin = bsk.window_lists(T, bm, bn, True, win, (bsk.BIG,) * len(win), sink, str(q.device))
                o = bsk.block_sparse_attention(qs, ks, vs, idx, cnt, nin=nin, block_m=bm, block_n=bn, causal=True,
                                               win_l=torch.tensor(win), sink=torch.tensor(sink))
                work += bsk.tile_work(cnt, bm, bn, B, len(hs))
            elif kind == "block_sparse":
                bs = self.block_size
                m = self if not sub else self._subset(hs)
                idx, cnt = m.block_lists(qs, ks)
                o = bsk.block_sparse_attention(qs, ks, vs, idx, cnt, block_m=bs, block_n=bs, causal=True)
                work += bsk.tile_work(cnt, bs, bs, B, len(hs))
            else:
                m = self if not sub else self._subset(hs)
                vert, slash = m.vertical_slash_sets(qs, ks)
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
        return super().attend(q, k, v, causal, key_padding_mask)

    def calibrate(self, samples, budget: float = 0.1, candidates=None) -> list[dict]:
        """The per-head pattern search (``search_patterns``) on calibration samples, an iterable
        of (q, k) pairs [B, H, T, D] / [B, Hkv, T, D] of one length (concatenated along the
        batch); the method then runs the heads it found (pattern ``searched``). Returns them."""
        qs, ks = zip(*[(q, k) for q, k in samples], strict=True)
        heads = search_patterns(torch.cat(qs), torch.cat(ks), budget, candidates, self.block_size, self.last_q)
        self.pattern, self.heads = "searched", [{kk: vv for kk, vv in h.items()} for h in heads]
        return heads

    def cost(self, tq, tk, causal) -> Cost:
        """Budgeted density: the most pairs the budgets allow, averaged over heads."""
        dense_pairs = masks.causal_pairs(tq, tk)
        pairs = 0.0
        for h in self.heads:
            if h["pattern"] == "a_shape":
                n = _ashape_pairs(tq, tk, h["num_sink"], h["window"])
            elif h["pattern"] == "vertical_slash":
                n = min(dense_pairs, tq * (h["vertical_size"] + h["slash_size"]))
            else:
                n = min(dense_pairs, tq * h["top_k_blocks"] * self.block_size)
            pairs += n / len(self.heads)
        index = 0.0
        if any(h["pattern"] == "vertical_slash" for h in self.heads):
            index += 2.0 * min(self.last_q, tq) * tk * self.head_dim
        return Cost(flops=self.num_heads * (4.0 * pairs * self.head_dim + index),
                    density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)


def _top_per_head(score, n_per_head):
    """[B, H, T] bool: each head's n_per_head[h] best entries, by one top-k of the largest
    budget for all heads (no loop over heads, one host sync)."""
    B, H, T = score.shape
    out = torch.zeros_like(score, dtype=torch.bool)
    n = n_per_head.clamp(max=T).view(1, H, 1)
    width = int(n.max())
    if width:
        keep = torch.arange(width, device=score.device).view(1, 1, width) < n
        out.scatter_(-1, score.topk(width, dim=-1).indices, keep.expand(B, H, width))
    return out


def _pool(x, bs):
    """[B, H, T, D] -> [B, H, ceil(T / bs), D] block means, summed in fp32 (no fp32 copy of x)."""
    B, H, T, D = x.shape
    n = math.ceil(T / bs)
    if n * bs != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, n * bs - T))
    cnt = torch.full((n,), float(bs), device=x.device)
    cnt[-1] = T - (n - 1) * bs
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.reshape(B, H, n, bs, D).sum(3, dtype=dt) / cnt.view(1, 1, n, 1)


def _ashape_pairs(tq, tk, sink, window):
    n, off = 0, tk - tq
    for i in range(tq):
        p = i + off
        local = min(window, p + 1)
        n += local + max(0, min(sink, p + 1 - local))
    return n


# ---- offline per-head pattern search ------------------------------------------------------
def default_candidates(T: int, block_size: int = 64) -> list[dict]:
    """Candidate patterns and budgets, sized as fractions of the calibration length."""
    frac = lambda f: max(1, int(T * f))  # noqa: E731
    nb = max(1, T // block_size)
    return (
        [dict(pattern="a_shape", num_sink=frac(1 / 256), window=frac(f)) for f in (1 / 32, 1 / 16, 1 / 8, 1 / 4)]
        + [dict(pattern="vertical_slash", num_sink=frac(1 / 256), window=frac(1 / 256), vertical_size=frac(v),
                slash_size=frac(s)) for v in (1 / 64, 1 / 16, 1 / 8) for s in (1 / 32, 1 / 16, 1 / 8)]
        + [dict(pattern="block_sparse", top_k_blocks=max(1, int(nb * f))) for f in (1 / 32, 1 / 16, 1 / 8, 1 / 4)]
    )


@torch.no_grad()
def search_patterns(q, k, budget: float, candidates=None, block_size: int = 64,
                    last_q: int = 64) -> list[dict]:
    """For each head, the candidate keeping the most causal attention mass (recall) with a
    density at most ``budget``; q: [B, H, T, D], k: [B, Hkv, T, D] calibration inputs."""
    B, H, T, D = q.shape
    candidates = default_candidates(T, block_size) if candidates is None else candidates
    exact = torch.softmax(
        (q.float() @ repeat_kv(k, H // k.shape[1]).float().transpose(-1, -2) / math.sqrt(D)).masked_fill(
            ~masks.materialize(masks.causal(0), 1, 1, T, T, q.device), float("-inf")), -1)
    pairs = masks.causal_pairs(T, T)
    best = [None] * H
    for cand in candidates:
        m = MInference(pattern=cand["pattern"], block_size=block_size, last_q=last_q, impl="reference",
                       num_heads=H, head_dim=D, num_kv_heads=k.shape[1],
                       **{kk: vv for kk, vv in cand.items() if kk != "pattern"})
        mod = masks.and_masks(m.mask_mod(q, k, True), masks.causal(0))
        mask = masks.materialize(mod, B, H, T, T, q.device)
        density = mask.float().sum((0, 2, 3)) / (B * pairs)  # [H]
        recall = (exact * mask).sum(-1).mean((0, 2))  # [H]
        for h in range(H):
            if density[h] <= budget and (best[h] is None or recall[h] > best[h]["recall"]):
                best[h] = {**cand, "recall": float(recall[h]), "density": float(density[h])}
    for h in range(H):
        if best[h] is None:
            raise ValueError(f"no candidate pattern fits the budget {budget} for head {h}")
    return best


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
    defaults = dict(num_sink=0, window=0, vertical_size=0, slash_size=0, top_k_blocks=0)
    return [{**defaults, **h} for h in heads]
