"""MoA: heterogeneous elastic sliding-window-plus-sink rules per head, found by profiling.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(2024, arXiv 2406.14909), Sec. 3-4. Causal only (an LLM's prefill).

Each head h keeps, for a query at position p over N keys, the keys j <= p with

    p - j < S_h(N) = alpha_h + beta_h * N     (an elastic sliding window, Sec. 3.2)
    or j < num_sink                            (attention sinks)

so heads differ in span and in how their span grows with the length. The rules come from
profiling (``calibrate``): on calibration q, k each candidate rule (alpha, beta) of each head
is scored by the attention mass it keeps and its density (the share of causal pairs), and the
rules are chosen to keep the most total mass with the heads' mean density within ``budget``
(the paper's Sec. 4: a gradient-weighted loss estimate and a mixed-integer program over
layers and lengths). Readings of this module: the loss estimate is the attention mass
dropped (no model gradient in a kernel benchmark), and the program is solved greedily (each
step takes the upgrade with the best mass per density that fits), per layer.

Without calibration every head uses the same rule (``alpha``, ``beta``; this module's
defaults: window N / 2, 64 sinks, MoA's sink size). ``rule_file`` (JSON, written by
``save_rules``) gives the per-head rules a calibration found. The pattern depends on the
shape only (``static_mask``); ``impl=triton`` runs ``methods.kernels.block_sparse`` with a
window and sink per head.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from methods import masks
from methods.base import Cost, SparseMethod, repeat_kv


class MoA(SparseMethod):
    name = "moa"
    # what the README's method table says (python -m analysis.readme)
    paper = "Fu et al. 2024"
    kind = "sparse (per-head elastic windows)"
    official_test = None
    supports_noncausal = False
    static_mask = True
    impls = ("reference", "flex", "triton")
    triton_backward = True  # the block-sparse kernel has one

    def __init__(self, alpha: int = 0, beta: float = 0.5, num_sink: int = 64, rule_file: str | None = None,
                 impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        _check_rule(alpha, beta)
        if not isinstance(num_sink, int) or num_sink < 0:
            raise ValueError(f"MoA: num_sink must be an integer >= 0, got {num_sink!r}")
        self.num_sink = num_sink
        self.rules = [(int(alpha), float(beta))] * self.num_heads
        if rule_file:
            self.rules = load_rules(rule_file, self.num_heads)

    def windows(self, n: int) -> list[int]:
        """Each head's span S_h(n) = alpha_h + beta_h * n (at least 1: the query itself)."""
        return [max(1, int(a + b * n)) for a, b in self.rules]

    def mask_mod(self, q, k, causal):
        tk = k.shape[2]
        off = tk - q.shape[2]
        win = torch.tensor(self.windows(tk), device=q.device)
        sink = self.num_sink

        def moa_mask(b, h, q_idx, kv_idx):
            return (q_idx + off - kv_idx < win[h]) | (kv_idx < sink)

        return moa_mask

    def flex_layout(self, q, k, causal, block):
        """Per head: the sink columns (``flex.columns``) and the band q - k < window[h]
        (``flex.band``)."""
        from methods.kernels import flex

        tq, tk, H = q.shape[2], k.shape[2], q.shape[1]
        win = torch.tensor(self.windows(tk), device=q.device).view(H, 1, 1)
        s_any, s_full = flex.columns(torch.arange(tk, device=q.device) < self.num_sink, block, tq)
        w_any, w_full = flex.band(tq, tk, block, -(2**40), win - 1, q.device)
        return s_any | w_any, s_full | w_full

    def triton_attend(self, q, k, v, causal, key_padding_mask):
        from methods.kernels import block_sparse as bsk

        T = q.shape[2]
        win = tuple(self.windows(T))
        sink = (self.num_sink,) * len(win)
        idx, cnt, nin = bsk.window_lists(T, 64, 64, True, win, (bsk.BIG,) * len(win), sink, str(q.device))
        out = bsk.block_sparse_attention(q, k, v, idx, cnt, nin=nin, block_m=64, block_n=64, causal=True,
                                         win_l=torch.tensor(win), sink=torch.tensor(sink),
                                         key_padding_mask=key_padding_mask)
        return out, bsk.tile_work(cnt, 64, 64, q.shape[0], q.shape[1])

    def head_pairs(self, tq: int, tk: int) -> list[float]:
        """Kept pairs of each head (exact): the window's, plus the sinks before it."""
        out = []
        for w in self.windows(tk):
            p = torch.arange(tk - tq, tk, dtype=torch.float64)
            local = torch.clamp(p + 1, max=w)
            out.append(float((local + torch.clamp(torch.clamp(p + 1 - local, min=0), max=self.num_sink)).sum()))
        return out

    def cost(self, tq, tk, causal) -> Cost:
        pairs = sum(self.head_pairs(tq, tk)) / self.num_heads
        return Cost(flops=4.0 * self.num_heads * pairs * self.head_dim, density=pairs / masks.causal_pairs(tq, tk),
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)

    # ---- profiling -------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, q, k, budget: float = 0.5, candidates=None) -> list[dict]:
        """Choose each head's rule on calibration q [B, H, T, D], k [B, Hkv, T, D]: the most
        kept attention mass with the mean density at most ``budget``. Returns per head the
        rule, its kept mass (mean over queries) and density; the method then uses the rules."""
        B, H, T, D = q.shape
        candidates = default_candidates() if candidates is None else candidates
        for a, b in candidates:
            _check_rule(a, b)
        if not 0 < budget <= 1:
            raise ValueError(f"MoA: budget must be in (0, 1], got {budget!r}")
        s = q.double() @ repeat_kv(k, H // k.shape[1]).double().transpose(-1, -2) / math.sqrt(D)
        pos = torch.arange(T, device=q.device)
        d = pos.view(T, 1) - pos.view(1, T)
        att = torch.softmax(s.masked_fill(d < 0, float("-inf")), -1)  # [B, H, T, T]
        pairs = masks.causal_pairs(T, T)
        mass = torch.zeros(H, len(candidates), dtype=torch.float64)
        dens = torch.zeros(len(candidates), dtype=torch.float64)
        for c, (a, b) in enumerate(candidates):
            w = max(1, int(a + b * T))
            keep = (d >= 0) & ((d < w) | (pos.view(1, T) < self.num_sink))
            mass[:, c] = (att * keep).sum(-1).mean((0, 2)).cpu()
            dens[c] = float(keep.sum()) / pairs
        if float(dens.min()) > budget:
            raise ValueError(f"MoA: no candidate rule fits the density budget {budget} "
                             f"(the sparsest has density {float(dens.min()):.3f})")
        choice = [int(dens.argmin())] * H
        while True:  # greedy: the upgrade with the most mass per density that fits the budget
            total = sum(float(dens[c]) for c in choice)
            best, gain = None, 0.0
            for h in range(H):
                for c in range(len(candidates)):
                    dd = float(dens[c] - dens[choice[h]])
                    dm = float(mass[h, c] - mass[h, choice[h]])
                    if dd > 0 and dm > 0 and total + dd <= budget * H + 1e-12 and dm / dd > gain:
                        best, gain = (h, c), dm / dd
            if best is None:
                break
            choice[best[0]] = best[1]
        self.rules = [tuple(candidates[c]) for c in choice]
        self.__dict__.pop("_block_masks", None)  # cached for the old rules
        return [{"alpha": candidates[c][0], "beta": candidates[c][1], "mass": float(mass[h, c]),
                 "density": float(dens[c])} for h, c in enumerate(choice)]


def _check_rule(alpha, beta) -> None:
    if not isinstance(alpha, int) or isinstance(alpha, bool) or alpha < 0:
        raise ValueError(f"MoA: alpha (the window's fixed part) must be an integer >= 0, got {alpha!r}")
    if not 0 <= beta <= 1:
        raise ValueError(f"MoA: beta (the window's share of the length) must be in [0, 1], got {beta!r}")


def default_candidates() -> list[tuple[int, float]]:
    """Rules profiled by default (this module's grid): fixed spans and elastic shares."""
    return [(a, b) for a in (0, 64, 256, 1024) for b in (0.0, 0.125, 0.25, 0.5)]


def save_rules(path, rules: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"version": 1, "heads": rules}, indent=1))


def load_rules(path, num_heads: int) -> list[tuple[int, float]]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"MoA rule file {path} does not exist; write one with MoA.calibrate and save_rules")
    heads = json.loads(p.read_text()).get("heads", [])
    if len(heads) != num_heads:
        raise ValueError(f"MoA rule file {path} has {len(heads)} heads, the model has {num_heads}")
    rules = [(int(h["alpha"]), float(h["beta"])) for h in heads]
    for a, b in rules:
        _check_rule(a, b)
    return rules
