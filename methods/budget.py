"""Equal-budget comparisons: a method's budget knob set so that it reaches a target density.

Sparse methods state their budgets in their own units (a window in tokens, blocks per query
block, a cumulative attention threshold). To compare them at one budget, ``fit_density`` sets a
method's budget knob (``KNOBS``: one hyperparameter per method that makes it keep more pairs as
it grows) by a search on the actual inputs: the density is the method's own ``last_density``
after a call (the share of the allowed, causal, pairs it computes), and the value kept is the
one whose density is nearest the target among those the search visits:

    integer knobs   binary search for the smallest value whose density reaches the target,
                    then the nearer of it and the value below it (log2(range) + 2 calls)
    float knobs     bisection over the range (``steps`` calls), the nearest value seen

The density of each method is assumed non-decreasing in its knob (true of the windows and
block counts; of the thresholds on the inputs of a call, as they add pairs in score order).
A target below the method's least density (its window or forced blocks) or above its largest
gives the bound: the record carries the achieved density beside the target.

MInference's knob depends on its pattern: a_shape the window, vertical_slash the number of
slashes (the verticals as configured), block_sparse the blocks per query block (a searched
pattern file has none: its budgets are per head). SeerAttention's knob is its top-k share of
the visible blocks (``nz_ratio``) under ``selection=topk``; under ``selection=threshold`` (its
official default) the density falls as the threshold grows, so that operating point has no knob
here (run it at ``selection=topk`` for an equal-budget comparison).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# method name -> (knob, integer, bounds(method, tq, tk) -> (lo, hi))
KNOBS: dict[str, tuple[str, bool, Callable]] = {
    "sliding_window": ("window", True, lambda m, tq, tk: (1, tk)),
    "bigbird": ("num_window_blocks", True, lambda m, tq, tk: (1, 2 * math.ceil(tk / m.block_size) + 1)),
    "hip": ("top_k", True, lambda m, tq, tk: (m.block_k, max(m.block_k, tk))),
    "nsa": ("num_selected", True, lambda m, tq, tk: (1, math.ceil(tk / m.block_size))),
    "sample_attention": ("alpha", False, lambda m, tq, tk: (1e-4, 1.0)),
    "sea": ("top_k_blocks", True, lambda m, tq, tk: (1, math.ceil(tk / m.block_size))),
    "streaming_llm": ("window", True, lambda m, tq, tk: (1, tk)),
    "sparge": ("cdf_threshold", False, lambda m, tq, tk: (0.0, 1.0)),
}
MINFERENCE_KNOBS = {  # pattern -> (knob, bounds)
    "a_shape": ("window", lambda m, tq, tk: (1, tk)),
    "vertical_slash": ("slash_size", lambda m, tq, tk: (0, tk)),
    "block_sparse": ("top_k_blocks", lambda m, tq, tk: (1, math.ceil(tk / m.block_size))),
}


def knob(method) -> tuple[str, bool, Callable] | None:
    """(name, integer, bounds) of the method's budget knob, or None where it has none."""
    if method.name == "minference":
        if method.pattern not in MINFERENCE_KNOBS:
            return None  # searched: budgets per head, from its pattern file
        name, bounds = MINFERENCE_KNOBS[method.pattern]
        return name, True, bounds
    if method.name == "seer_attention":
        return ("nz_ratio", False, lambda m, tq, tk: (1e-4, 1.0)) if method.selection == "topk" else None
    return KNOBS.get(method.name)


def with_budget(method, value):
    """A copy of ``method`` with its budget knob at ``value`` (caches of masks and layouts
    built for the old value dropped)."""
    spec = knob(method)
    if spec is None:
        raise ValueError(f"{type(method).__name__} has no budget knob (methods.budget.KNOBS)")
    name, integer, _ = spec
    m = copy.deepcopy(method)
    value = int(value) if integer else float(value)
    if method.name == "minference":
        m.heads = [{**h, name: value} for h in m.heads]
    else:
        setattr(m, name, value)
    for cache in ("_block_masks", "_layouts"):
        if cache in m.__dict__:
            m.__dict__[cache] = {}
    return m


@dataclass
class Fit:
    method: object  # the method at the budget
    knob: str
    value: float
    density: float  # achieved on the inputs
    target: float
    calls: int

    def record(self) -> dict:
        return {"knob": self.knob, "value": self.value, "target_density": self.target,
                "density_achieved": self.density, "calls": self.calls}


def density_of(method, q, k, v, causal) -> float:
    """The method's density on these inputs: ``last_density`` after a call."""
    with torch.no_grad():
        method(q, k, v, causal=causal)
    if method.last_density is None:
        raise ValueError(f"{type(method).__name__} does not report its density (last_density)")
    return float(method.last_density)


def fit_density(method, q, k, v, causal: bool, target: float, steps: int = 14) -> Fit:
    """The method with its budget knob set to reach ``target`` density on q, k, v (module
    docstring). ValueError for a target outside (0, 1] or a method without a knob."""
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target <= 1:
        raise ValueError(f"target density must be a number in (0, 1], got {target!r}")
    spec = knob(method)
    if spec is None:
        have = sorted([*KNOBS, "minference", "seer_attention (selection=topk)"])
        raise ValueError(f"{type(method).__name__} has no budget knob for an equal-budget run "
                         f"(methods with one: {', '.join(have)})")
    name, integer, bounds = spec
    lo, hi = bounds(method, q.shape[2], k.shape[2])
    seen: dict = {}

    def at(x):
        if x not in seen:
            m = with_budget(method, x)
            seen[x] = (m, density_of(m, q, k, v, causal))
        return seen[x][1]

    if integer:
        a, b = int(lo), int(hi)
        if at(b) >= target:  # the smallest value in [a, b] whose density reaches the target
            while a < b:
                mid = (a + b) // 2
                if at(mid) >= target:
                    b = mid
                else:
                    a = mid + 1
            if b > lo:
                at(b - 1)
    else:
        a, b = float(lo), float(hi)
        for _ in range(steps):
            mid = (a + b) / 2
            if at(mid) >= target:
                b = mid
            else:
                a = mid
        at(a), at(b)
    best = min(seen, key=lambda x: (abs(seen[x][1] - target), x))
    m, d = seen[best]
    return Fit(method=m, knob=name, value=best, density=d, target=float(target), calls=len(seen))
