"""FlexAttention with a mask function: the real block-sparse path of block-aligned patterns.

On CUDA both the block mask (``_compile=True``: a plain ``create_block_mask`` at 64k tokens
tries to allocate 512 GiB) and the attention are compiled, so masked-out blocks are skipped.
On the CPU the attention runs eagerly (correct, but it materialises the scores): such a run
is not a real kernel, and ``ran_compiled`` says which one ran.
"""
from __future__ import annotations

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


def block_density(bm, pairs: float) -> float:
    """Work the kernel really does: visited blocks x block area over the allowed pairs."""
    n = bm.kv_num_blocks.sum()
    if bm.full_kv_num_blocks is not None:
        n = n + bm.full_kv_num_blocks.sum()
    bq, bk = bm.BLOCK_SIZE
    return float(n) * bq * bk / pairs


def usable(q, k, v) -> bool:
    """Eager FlexAttention has no CPU backward: there, with gradients, use the dense mask."""
    return q.device.type == "cuda" or not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def attention(q, k, v, bm, scale=None) -> tuple[torch.Tensor, bool]:
    """flex_attention(q, k, v) under block mask ``bm``; returns (output, ran_compiled)."""
    from torch.nn.attention.flex_attention import flex_attention

    gqa = k.shape[1] != q.shape[1]
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa), True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = flex_attention(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa)
    return out, False
