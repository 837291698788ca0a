"""SnapKV: keep the prefix tokens the last prompt queries (the observation window) vote for.

Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen, "SnapKV: LLM Knows What You are
Looking for Before Generation" (NeurIPS 2024), Sec. 4.2, Listing 1; official code
FasterDecoding/SnapKV (``snapkv_utils.py``, ``SnapKVCluster``); kvpress's ``SnapKVPress``.

With the last w prefill queries (the observation window) and causal softmax attention
P [w, L] of each query head over the prefill's keys (query L - w + i sees keys <= L - w + i):

    C_j = sum_i P_ij                       (votes of the window for prefix token j < L - w)
    C'_j = (1/k) sum_{|t| <= k//2} C_{j+t} (1D average pooling, kernel k, zero padding)

the query heads of a KV head averaged (kvpress's grouping for GQA; the official code runs on
repeated heads), and each (batch, KV head) keeps the window (always) and the prefix tokens of
largest C', n = max(1, int(L (1 - ratio))) tokens in all (kvpress's budget: the official code
takes an absolute ``max_capacity_prompt``). kvpress averages the window's votes instead of
summing them (the same ranking). Defaults as the official code and kvpress: window 64,
kernel 5, average pooling (``pooling="max"``: max pooling, the official code's option).
A prefill of no more tokens than the window is refused (kvpress asserts the same).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import AttentionInputError
from methods.decode import KVCache
from methods.press import Press, window_attention


class SnapKV(Press):
    name = "snapkv"
    # what the README's method table says (python -m analysis.readme)
    paper = "Li et al. 2024"
    official_test = None

    def __init__(self, ratio: float = 0.5, window_size: int = 64, kernel_size: int = 5, pooling: str = "avg",
                 impl: str = "reference", **structural):
        super().__init__(ratio=ratio, impl=impl, **structural)
        if window_size < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SnapKV: window_size must be >= 1 and kernel_size odd and >= 1, got "
                             f"{window_size}, {kernel_size}")
        if pooling not in ("avg", "max"):
            raise ValueError(f"SnapKV: pooling must be 'avg' or 'max', got {pooling!r}")
        self.window_size, self.kernel_size, self.pooling = int(window_size), int(kernel_size), pooling

    def decode_params(self) -> dict:
        return {"ratio": self.ratio, "window_size": self.window_size, "kernel_size": self.kernel_size,
                "pooling": self.pooling}

    def scores(self, cache: KVCache, q) -> torch.Tensor:
        if q is None:
            raise AttentionInputError("SnapKV: the press needs the prefill's queries (its observation window)")
        L, w = cache.length, self.window_size
        if L <= w:
            raise AttentionInputError(f"SnapKV: the prefill ({L} tokens) must be longer than the observation "
                                      f"window (window_size={w})")
        p = window_attention(q, cache.keys(), w)[..., :L - w]  # [B, Hkv, g, w, L - w]
        votes = p.sum(-2)  # [B, Hkv, g, L - w]
        B, Hkv, g, n = votes.shape
        flat, pad = votes.reshape(B * Hkv * g, 1, n), self.kernel_size // 2
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        pooled = pool(flat, self.kernel_size, stride=1, padding=pad).view(B, Hkv, g, n).mean(2)
        return torch.cat([pooled, pooled.new_full((B, Hkv, w), float("inf"))], dim=-1)


__all__ = ["SnapKV"]
