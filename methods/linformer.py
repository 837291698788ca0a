"""Linformer: attention over learned projections of the sequence axis.

Wang et al., "Linformer: Self-Attention with Linear Complexity" (2020), Sec. 4 and 4.1.

    K' = E K,  V' = F V          E, F: [k, n] learned, n = max_seq_len, k = proj_len
    out = softmax(Q K'^T / sqrt(d)) V'                    [B, H, T, d]

Sharing (Sec. 4.1): ``none`` (E_i, F_i per head), ``headwise`` (one E and one F for all
heads of a layer), ``kv`` (E = F, one for all heads), ``layerwise`` (one E for K and V,
heads and every layer: a model ties its layers through ``share_parameters_with``).

Inputs shorter than ``max_seq_len`` use the first T columns of E and F, which is exactly
zero-padding the sequence to n; longer inputs are an error. Padded keys (key_padding_mask)
are zeroed before projection, so they contribute nothing. Linformer mixes all positions in
its projections, so it is not causal: ``causal=True`` is an error, not a leak of the future.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from methods.base import (
    AttentionInputError,
    AttentionMethod,
    Cost,
    check_int,
    dense_flops,
    repeat_kv,
)

SHARING = ("none", "headwise", "kv", "layerwise")


class Linformer(AttentionMethod):
    name = "linformer"
    # what the README's method table says (python -m analysis.readme)
    paper = "Wang et al. 2020"
    kind = "low-rank (learned)"
    official_test = None
    supports_causal = False
    trainable = True
    training_free = False

    def __init__(self, proj_len: int = 256, sharing: str = "headwise", **structural):
        super().__init__(**structural)
        if sharing not in SHARING:
            raise ValueError(f"Linformer: sharing must be one of {SHARING}, got {sharing!r}")
        check_int("Linformer", "proj_len", proj_len)
        if self.max_seq_len is None:
            raise ValueError("Linformer needs max_seq_len: its projections are [proj_len, max_seq_len]")
        self.proj_len, self.sharing = proj_len, sharing
        n, k = self.max_seq_len, proj_len
        heads = self.num_kv_heads if sharing == "none" else 1
        bound = 1.0 / math.sqrt(k)
        self.E = nn.Parameter(torch.empty(heads, k, n).uniform_(-bound, bound))
        if sharing in ("none", "headwise"):
            self.F = nn.Parameter(torch.empty(heads, k, n).uniform_(-bound, bound))
        else:
            self.F = None  # E serves keys and values

    @property
    def real_kernel(self) -> bool:
        return True  # the reference computes only the T x k scores

    def share_parameters_with(self, first: "Linformer") -> None:
        """Layerwise sharing: use the first layer's projection."""
        if self.sharing == "layerwise":
            self.E = first.E

    def attend(self, q, k, v, causal, key_padding_mask):
        n = k.shape[2]
        E = self.E[:, :, :n]  # [heads, k, n]: first n columns == zero-padding to max_seq_len
        F = E if self.F is None else self.F[:, :, :n]
        dt = torch.float64 if q.dtype == torch.float64 else q.dtype
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep
        kp = torch.matmul(E.to(dt), k.to(dt))  # [B, Hkv, k, d]
        vp = torch.matmul(F.to(dt), v.to(dt))  # [B, Hkv, k, d]
        rep = q.shape[1] // k.shape[1]
        kp, vp = repeat_kv(kp, rep), repeat_kv(vp, rep)
        s = torch.matmul(q.to(dt), kp.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, T, k]
        return torch.matmul(torch.softmax(s.float() if dt != torch.float64 else s, -1).to(dt), vp).to(q.dtype)

    def check_inputs(self, q, k, v, causal, key_padding_mask):
        if causal in (True, False) and causal:  # (a causal flag that is no bool: the base check)
            raise AttentionInputError(
                "Linformer is not causal: its projections mix every position, so causal=True "
                "would leak the future")
        super().check_inputs(q, k, v, causal, key_padding_mask)
        if self.sharing == "none" and k.shape[1] != self.num_kv_heads:
            raise AttentionInputError(
                f"Linformer(sharing='none') has projections for num_kv_heads={self.num_kv_heads}, "
                f"got k with {k.shape[1]} heads")

    def cost(self, tq, tk, causal) -> Cost:
        kk, d, h = self.proj_len, self.head_dim, self.num_heads
        flops = self.num_kv_heads * 2 * (2.0 * kk * tk * d) + h * 4.0 * tq * kk * d
        return Cost(flops=flops, density=flops / dense_flops(h, d, tq, tk, False),
                    kv_bytes=2.0 * self.num_kv_heads * kk * d * 2)
