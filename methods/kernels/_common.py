"""Shared pieces of the Triton kernels in ``methods.kernels`` (every kernel module imports this one
and no other kernel module).

usable(q)          whether the kernels can run on these tensors (CUDA, or CPU under
                   ``TRITON_INTERPRET=1``); _check, _tile, _num_warps: argument and launch helpers.
LOG2E              the kernels work in base 2 (exp2): scores are scaled by scale * LOG2E and the
                   stored log-sum-exps are base 2.
NSA_LAUNCH         launch settings of NSA's kernels (``nsa_compressed`` and ``nsa_selected``).
@triton.jit        _online_softmax_step / _softmax_update (the FlashAttention forward's online
                   softmax); _row_inputs, _dq_step, _dkdv_step (the backward's probability
                   recompute from the stored LSE and its dQ and dK/dV updates); _delta (the
                   softmax backward's dO * O row sums, in PyTorch).
Tensors are [B, H, T, D] (queries) and [B, Hkv, T, D] (keys, values; grouped-query heads share).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

LOG2E = 1.4426950408889634
# launch settings of NSA's kernels: compressed (block_m, block_n, num_warps, num_stages);
# importance (rows: tokens x the group's heads, block_n, warps, stages[, atomic add]), one
# setting for groups of several heads and one for a head alone (MHA); selected (order, segment,
# warps, stages: per token, its tile is its block; or by key block for groups of at most
# NSA_SMALL_GROUP heads); topn: warps (one row a program). scripts/tune_nsa.py times
# alternatives at 64k (kernels/tune_nsa_f73bb5b.jsonl, paper shape and MHA: importance 17.4 ->
# 9.4 ms and 106 -> 24 ms, compressed 12.0 -> 9.9, top-n 3.5 -> 2.4; tune_nsa_mha_f839956:
# MHA importance added atomically 24 -> 16 ms; tune_nsa_sel*_4fcb193: the selection by key
# block, MHA 118 -> 18 ms, groups of 16 heads 15 per token against 27)
NSA_LAUNCH = {"compressed": (128, 64, 8, 3), "importance": (256, 32, 8, 3), "importance_mha": (128, 32, 4, 2, 1),
              "selected": (0, 0, 2, 2), "selected_small": (1, 256, 4, 1), "topn": 1}


def read_entries(path: Path) -> tuple[dict, ...]:
    """The ``entries`` of a launch-settings table (a JSON file a tuning script wrote: the tile
    table, the decode launch table); empty where the file is absent."""
    if not path.exists():
        return ()
    return tuple(json.loads(path.read_text())["entries"])


def usable(q: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors (CUDA, or the CPU interpreter)."""
    if triton is None:
        return False
    return q.is_cuda or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, q, k, v, ok, qk_scale):
        """One tile: scores q @ k ([M, D] x [D, N]) under ``ok`` (True: no mask), folded into
        (acc, m, l)."""
        return _softmax_update(acc, m_i, l_i, tl.dot(q, k), qk_scale, v, ok)

    @triton.jit
    def _softmax_update(acc, m_i, l_i, s, scale, v, ok):
        """Scores ``s * scale`` (base 2, scale > 0) of a tile under ``ok``, folded into (acc, m, l).
        As FlashAttention-2: the scale goes into one multiply-add with the row maximum, and the
        rescaled accumulator into the product's accumulator."""
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
        p = tl.exp2(s * scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, m_new, l_i


    @triton.jit
    def _row_inputs(Q, DO, LSE, DELTA, rows, stat, live):
        """A tile's query rows and their output gradients (offsets ``rows`` [M, D]) and their
        LSE and dO*O row sums (offsets ``stat`` [M]); rows not ``live`` see nothing (LSE inf)."""
        q = tl.load(Q + rows, mask=live[:, None], other=0.0)
        do = tl.load(DO + rows, mask=live[:, None], other=0.0)
        lse = tl.load(LSE + stat, mask=live, other=float("inf"))
        return q, do, lse, tl.load(DELTA + stat, mask=live, other=0.0)

    @triton.jit
    def _dq_step(dq, q, do, k, v, ok, lse, delta, qk_scale):
        """One key tile k, v [N, D] for query rows q, do [M, D]: the probabilities recomputed
        from the rows' LSE under ``ok`` [M, N], dq += dS K."""
        p = tl.where(ok, tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k)

    @triton.jit
    def _dkdv_step(dk, dv, k, v, q, do, ok, lse, delta, qk_scale):
        """One tile of query rows q, do [M, D] for keys k, v [N, D], key-major (``ok`` [N, M]):
        dv += P^T dO, dk += dS^T Q (unscaled); also returns dS^T [N, M] in q's dtype."""
        pt = tl.where(ok, tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dst = (pt * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(q.dtype)
        return dk + tl.dot(dst, q), dv, dst


def _check(q, k, v):
    if triton is None:
        raise RuntimeError("triton is not installed")
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head dim >= 16, got {D}")
    return (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))


def _tile(n: int) -> int:
    """The power-of-two tile (at least 16, for tl.dot) that holds ``n``."""
    return max(16, triton.next_power_of_2(n))


def _num_warps(block_m: int, D: int) -> int:
    return 8 if block_m * D >= 128 * 128 else 4


def _delta(do, out):
    """Each row's sum of dO * O in fp32 [B, H, T]: the softmax backward's correction term."""
    return (do.float() * out.float()).sum(-1).contiguous()
