"""Named mask functions, combined with `and_masks` / `or_masks` (attention-gym style).

A mask function has FlexAttention's ``mask_mod`` signature ``(b, h, q_idx, kv_idx) -> bool``
and works on broadcastable index tensors, so the same closure serves the dense references
(`materialize`) and the block-sparse paths (`torch.nn.attention.flex_attention`).

Causal masks are end-aligned: with ``Tq`` queries and ``Tk`` keys, query ``i`` sits at
position ``Tk - Tq + i`` (prefill of the last ``Tq`` tokens over a cache of ``Tk``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def full() -> MaskMod:
    def full_mask(b, h, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)  # all True, broadcast to the index shapes

    return full_mask


def causal(offset: int = 0) -> MaskMod:
    """Query ``q_idx`` (at position ``q_idx + offset``) sees keys at or before it."""

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal_mask


def sliding_window(window: int, offset: int = 0) -> MaskMod:
    """Keys less than ``window`` positions before the query (the query itself included)."""

    def window_mask(b, h, q_idx, kv_idx):
        return (q_idx + offset - kv_idx) < window

    return window_mask


def key_padding(key_padding_mask: torch.Tensor) -> MaskMod:
    """``key_padding_mask``: [B, Tk] bool, True for a real key, False for padding."""

    def padding_mask(b, h, q_idx, kv_idx):
        return key_padding_mask[b, kv_idx]

    return padding_mask


def and_masks(*mods: MaskMod) -> MaskMod:
    def and_mask(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    return and_mask


def or_masks(*mods: MaskMod) -> MaskMod:
    def or_mask(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    return or_mask


def materialize(mod: MaskMod, B: int, H: int, tq: int, tk: int, device=None) -> torch.Tensor:
    """Evaluate a mask function on the full grid: a [B, H, Tq, Tk] bool tensor."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(tq, device=device).view(1, 1, tq, 1)
    k = torch.arange(tk, device=device).view(1, 1, 1, tk)
    return mod(b, h, q, k).expand(B, H, tq, tk)


def attention_mask(
    B: int, H: int, tq: int, tk: int, causal_: bool, key_padding_mask=None, device=None
) -> torch.Tensor | None:
    """The [B, H|1, Tq, Tk] bool mask of plain (dense) attention, or None when all is allowed."""
    mods = []
    if causal_:
        mods.append(causal(tk - tq))
    if key_padding_mask is not None:
        mods.append(key_padding(key_padding_mask))
    if not mods:
        return None
    return materialize(and_masks(*mods), B, 1, tq, tk, device=device)


def window_pairs(p0: int, p1: int, window: int) -> int:
    """Pairs a causal window of ``window`` keys allows the queries at positions p0 .. p1 - 1:
    the sum of min(window, p + 1), in closed form."""
    m = min(max(window - 1, p0), p1)  # positions below window - 1 see p + 1 keys, the rest window
    return (m * (m + 1) - p0 * (p0 + 1)) // 2 + (p1 - m) * window


def causal_pairs(tq: int, tk: int) -> int:
    """Number of (query, key) pairs an end-aligned causal mask allows."""
    if tq <= tk:
        return tq * (tk - tq) + tq * (tq + 1) // 2
    return tk * (tk + 1) // 2  # queries before the first key see nothing


def pack_bits(lay: torch.Tensor, rows: int | None = None, word_bits: int = 64) -> torch.Tensor:
    """[..., n] bool -> [..., ceil(n / word_bits)] words (int64 for 64 bits, the top bit as the
    sign: the sum of distinct powers of two is exact; uint8 for 8), bit j % word_bits of word
    j // word_bits = lay[..., j], by chunks of rows (default: 2^26 bits a chunk, a 512 MiB int64
    temporary). Bytes suit a mask function that gathers one word per (query, key) element: a
    compiled FlexAttention kernel stages such a [BLOCK_M, BLOCK_N] gather in shared memory, and
    int64 words there overflow an H200's (368 KiB asked for, 227 KiB exist)."""
    if word_bits not in (8, 64):
        raise ValueError(f"word_bits must be 8 or 64, got {word_bits}")
    n = lay.shape[-1]
    rows = rows or max(1, (1 << 26) // max(n, 1))
    nw = -(-n // word_bits)
    flat = lay.reshape(-1, n)
    out = torch.empty(flat.shape[0], nw, dtype=torch.int64 if word_bits == 64 else torch.uint8, device=lay.device)
    bits = torch.ones(word_bits, dtype=torch.int64, device=lay.device) << torch.arange(word_bits, device=lay.device)
    for a in range(0, flat.shape[0], rows):
        x = torch.nn.functional.pad(flat[a:a + rows], (0, nw * word_bits - n)).view(-1, nw, word_bits)
        out[a:a + rows] = (x.to(torch.int64) * bits).sum(-1).to(out.dtype)
    return out.view(*lay.shape[:-1], nw)
