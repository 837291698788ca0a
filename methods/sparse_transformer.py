"""Sparse Transformer: strided and fixed factorized attention patterns.

Child, Gray, Radford and Sutskever, "Generating Long Sequences with Sparse Transformers"
(arXiv 1904.10509, 2019), Sec. 4.2-4.3. With stride l, position i attends to A_i = A1_i | A2_i:

    strided:  A1_i = {j : i - l <= j <= i}            (the previous l positions and itself)
              A2_i = {j : (i - j) mod l = 0}           (every l-th position before it)
    fixed:    A1_i = {j : floor(j / l) = floor(i / l)} (its own block of l positions)
              A2_i = {j : j mod l >= l - c}            (the last c positions of every block:
                                                        the "summary" cells)

combined as the paper's "merged head" (Sec. 4.3, 2.: one head attends to the union of both),
the default, or ``heads=split`` (its 3.: the heads share the pattern out, even heads A1 and
odd heads A2). The paper defines the patterns for autoregressive models (j <= i, the causal
mask is applied on top); the non-causal patterns used here for an encoder are this
harness's reading: the same sets without the j <= i limit (strided: |i - j| <= l or
(i - j) mod l = 0; fixed: the same block or a summary cell anywhere).

Defaults: l = 128 and c = 8 (the paper uses l in {128, 256} with c in {8, 16, 32}; the
official code, openai/sparse_attention, calls them ``local_attn_ctx`` and ``c``). Positions
are end-aligned (query i of Tq sits at Tk - Tq + i). The pattern depends only on the shape,
so FlexAttention caches its block mask; the strided diagonals are not blockwise, so there is
no Triton block-sparse plan (flex skips the wholly masked tiles). Decoding keeps the pattern.
"""
from __future__ import annotations

from methods import masks
from methods.base import Cost, SparseMethod

PATTERNS = ("strided", "fixed")
HEADS = ("merged", "split")


class SparseTransformer(SparseMethod):
    name = "sparse_transformer"
    # what the README's method table says (python -m analysis.readme)
    paper = "Child et al. 2019"
    kind = "sparse (fixed pattern)"
    official_test = None
    static_mask = True
    supports_decode = True

    def __init__(self, pattern: str = "strided", stride: int = 128, summary: int = 8,
                 heads: str = "merged", impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        if pattern not in PATTERNS:
            raise ValueError(f"SparseTransformer: pattern must be one of {PATTERNS}, got {pattern!r}")
        if heads not in HEADS:
            raise ValueError(f"SparseTransformer: heads must be one of {HEADS}, got {heads!r}")
        if stride < 1:
            raise ValueError(f"SparseTransformer: stride must be >= 1, got {stride}")
        if pattern == "fixed" and not 1 <= summary <= stride:
            raise ValueError(f"SparseTransformer: summary c must be in [1, stride={stride}], got {summary}")
        if heads == "split" and self.num_heads < 2:
            raise ValueError("SparseTransformer: heads=split needs at least 2 heads")
        self.pattern, self.stride, self.summary, self.heads = pattern, stride, summary, heads

    def mask_mod(self, q, k, causal):
        l, c, off, split = self.stride, self.summary, k.shape[2] - q.shape[2], self.heads == "split"
        strided = self.pattern == "strided"

        def sparse_transformer_mask(b, h, q_idx, kv_idx):
            i = q_idx + off
            if strided:
                a1 = (i - kv_idx).abs() <= l
                a2 = (i - kv_idx) % l == 0
            else:
                a1 = i // l == kv_idx // l
                a2 = kv_idx % l >= l - c
            if split:
                even = h % 2 == 0
                return (even & a1) | (~even & a2)
            return a1 | a2

        return sparse_transformer_mask

    def cost(self, tq, tk, causal) -> Cost:
        import torch

        mod = self.mask_mod(torch.empty(1, 1, tq, 1), torch.empty(1, 1, tk, 1), causal)
        if causal:
            mod = masks.and_masks(mod, masks.causal(tk - tq))
        pairs = 0.0
        for h in range(min(self.num_heads, 2)):  # the pattern differs between even and odd heads only
            rows = 1 + (self.num_heads - 1 - h) // 2
            step = max(1, 2**22 // max(tk, 1))
            for s in range(0, tq, step):  # in row blocks: long sequences do not materialise T x T
                qi = torch.arange(s, min(tq, s + step)).view(-1, 1)
                pairs += rows * float(mod(torch.zeros(()), torch.tensor(h), qi, torch.arange(tk).view(1, -1)).sum())
        pairs /= self.num_heads
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        return Cost(flops=4.0 * self.num_heads * pairs * self.head_dim, density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)
