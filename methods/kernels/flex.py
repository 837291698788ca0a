"""FlexAttention with a mask function: the real block-sparse path of block-aligned patterns.

On CUDA both the block mask (``_compile=True``: a plain ``create_block_mask`` at 64k tokens
tries to allocate 512 GiB) and the attention are compiled, so masked-out blocks are skipped.
On the CPU the attention runs eagerly (correct, but it materialises the scores): such a run
is not a real kernel, and ``ran_compiled`` says which one ran.

``create_block_mask`` evaluates the mask function on every (query, key) element to find the
blocks (180 ms at 16k for MInference's index look-ups, issue 28). Methods that know their
blocks give them instead (``SparseMethod.flex_layout``): ``from_layout`` builds the BlockMask
from block layouts with ``BlockMask.from_kv_blocks``, the blocks wholly inside the pattern
marked full (no mask function runs in them), the others partial (it still does); ``band``
and ``coarsen`` are the layouts of a diagonal band and of a pattern of other blocks.
"""
from __future__ import annotations

import math
import warnings

import torch

_COMPILED = None


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo.config as dc

        for knob in ("cache_size_limit", "recompile_limit"):  # one compile per shape and mask kind
            if hasattr(dc, knob):
                setattr(dc, knob, max(getattr(dc, knob), 256))
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def block_mask(mask_mod, B, H, tq, tk, device, block_size: int = 128):
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = torch.device(device).type == "cuda"
    return create_block_mask(mask_mod, B, H, tq, tk, device=device, BLOCK_SIZE=block_size,
                             _compile=compiled)


def from_layout(partial, full, mask_mod, tq: int, tk: int, block_size: int = 128):
    """BlockMask from block layouts [B|1, H|1, nq, nk] bool: ``partial`` blocks (the mask
    function runs inside them) and ``full`` ones (wholly kept: it does not)."""
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = torch.broadcast_tensors(partial & ~full, full)
    partial, full = (x.reshape((1,) * (4 - x.dim()) + x.shape) for x in (partial, full))

    def lists(lay):  # kept blocks first, in increasing order (a stable sort of the flags)
        lay = lay.contiguous()
        num = lay.sum(-1, dtype=torch.int32)
        idx = torch.sort(lay.to(torch.uint8), dim=-1, descending=True, stable=True).indices
        return num.contiguous(), idx.to(torch.int32).contiguous()

    kn, ki = lists(partial)
    fn, fi = lists(full)
    return BlockMask.from_kv_blocks(kn, ki, fn, fi, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(tq, tk))


def band(tq: int, tk: int, block: int, lo, hi, device=None):
    """(any, full) [.., nq, nk] for the pairs with lo <= q + (tk - tq) - k <= hi (lo, hi:
    ints or [H, 1, 1] tensors): blocks the band touches, and blocks wholly inside it."""
    nq, nk = math.ceil(tq / block), math.ceil(tk / block)
    qs = torch.arange(nq, device=device).view(nq, 1) * block + (tk - tq)
    qe = torch.clamp(qs + block - 1, max=tk - 1)
    ks = torch.arange(nk, device=device).view(1, nk) * block
    ke = torch.clamp(ks + block - 1, max=tk - 1)
    dmin, dmax = qs - ke, qe - ks
    return (dmax >= lo) & (dmin <= hi), (dmin >= lo) & (dmax <= hi)


def columns(keep, block: int, tq: int):
    """(any, full) [.., nq, nk] for key columns ``keep`` [.., tk] bool (every query row): the
    blocks holding a kept column, and those whose columns are all kept."""
    tk = keep.shape[-1]
    nq, nk = math.ceil(tq / block), math.ceil(tk / block)
    x = torch.nn.functional.pad(keep, (0, nk * block - tk)).view(*keep.shape[:-1], 1, nk, block)
    return x.any(-1).expand(*keep.shape[:-1], nq, nk), x.all(-1).expand(*keep.shape[:-1], nq, nk)


def coarsen(lay, rows: int, cols: int, block: int, tq: int, tk: int):
    """(any, full) at ``block`` of a layout [.., nq, nk] bool of ``rows`` x ``cols`` blocks
    (each a divisor of ``block``), or None where they do not divide it."""
    if block % rows or block % cols:
        return None
    fr, fc = block // rows, block // cols
    nq, nk = math.ceil(tq / block), math.ceil(tk / block)
    lay = lay[..., :nq * fr, :nk * fc]
    pad = (0, nk * fc - lay.shape[-1], 0, nq * fr - lay.shape[-2])
    x = torch.nn.functional.pad(lay, pad).reshape(*lay.shape[:-2], nq, fr, nk, fc)
    return x.any(-1).any(-2), x.all(-1).all(-2)


def clip(any_, full, tq: int, tk: int, block: int, causal: bool):
    """Causality and the sequence ends on a method's (any, full): blocks wholly after the
    diagonal dropped, full blocks only wholly before it and wholly inside [0, tq) x [0, tk)."""
    lo = -(2**40) if not causal else 0
    vis, inside = band(tq, tk, block, lo, 2**40, any_.device)
    nq, nk = vis.shape
    edge = (torch.arange(nq, device=any_.device).view(nq, 1) + 1) * block <= tq
    edge = edge & ((torch.arange(nk, device=any_.device).view(1, nk) + 1) * block <= tk)
    return any_ & vis, full & any_ & inside & edge


def block_density(bm, pairs: float, batch: int, heads: int) -> float:
    """Work the kernel really does: visited blocks x block area over the allowed pairs (of all
    ``batch`` x ``heads``). A mask built once for every batch row or head (leading size 1) is
    visited by each of them: its blocks count ``batch`` or ``heads`` times."""
    n = bm.kv_num_blocks.sum()
    if bm.full_kv_num_blocks is not None:
        n = n + bm.full_kv_num_blocks.sum()
    mb, mh = bm.kv_num_blocks.shape[:2]
    bq, bk = bm.BLOCK_SIZE
    return float(n) * (batch // mb) * (heads // mh) * bq * bk / pairs


def usable(q, k, v) -> bool:
    """Eager FlexAttention has no CPU backward: there, with gradients, use the dense mask."""
    return q.device.type == "cuda" or not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def _flex(q, k, v, bm, scale, return_lse: bool):
    """flex_attention under block mask ``bm``: compiled on CUDA, eager elsewhere; returns
    (its result, ran_compiled)."""
    from torch.nn.attention.flex_attention import flex_attention

    kw = dict(block_mask=bm, scale=scale, enable_gqa=k.shape[1] != q.shape[1], return_lse=return_lse)
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, **kw), True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, **kw), False


def attention(q, k, v, bm, scale=None) -> tuple[torch.Tensor, bool]:
    """flex_attention(q, k, v) under block mask ``bm``; returns (output, ran_compiled)."""
    return _flex(q, k, v, bm, scale, False)


def attention_lse(q, k, v, bm, scale=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """flex_attention(q, k, v) under block mask ``bm`` with its log-sum-exp per query row
    (natural log, [B, H, Tq]); returns (output, lse, ran_compiled)."""
    (out, lse), compiled = _flex(q, k, v, bm, scale, True)
    return out, lse, compiled
