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

import torch

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

    def flex_layout(self, q, k, causal, block):
        """A1 and A2 at FlexAttention's ``block`` from the block's position ranges: strided A1
        a band (``flex.band``), A2 the blocks whose offset range q - k holds a multiple of l;
        fixed A1 the blocks whose l-blocks meet, A2 the summary columns (``flex.columns``).
        Per head (split) or their union (merged: a block kept only by the union stays partial)."""
        from methods.kernels import flex

        H, tq, tk, l = q.shape[1], q.shape[2], k.shape[2], self.stride
        dev = q.device
        nq, nk = -(-tq // block), -(-tk // block)
        ps = torch.arange(nq, device=dev).view(nq, 1) * block + (tk - tq)
        pe = torch.clamp(ps + block - 1, max=tk - 1)
        ks = torch.arange(nk, device=dev).view(1, nk) * block
        ke = torch.clamp(ks + block - 1, max=tk - 1)
        if self.pattern == "strided":
            a1 = flex.band(tq, tk, block, -l, l, dev)
            dmin, dmax = ps - ke, pe - ks
            a2 = (torch.div(dmax, l, rounding_mode="floor") * l >= dmin, (dmin <= dmax) & (l == 1))
        else:
            a1 = ((ps // l <= ke // l) & (ks // l <= pe // l), (ps // l == pe // l) & (ps // l == ks // l) &
                  (ks // l == ke // l))
            a2 = flex.columns(torch.arange(tk, device=dev) % l >= l - self.summary, block, tq)
        if self.heads == "split":
            even = (torch.arange(H, device=dev) % 2 == 0).view(H, 1, 1)
            return torch.where(even, a1[0], a2[0]), torch.where(even, a1[1], a2[1])
        return a1[0] | a2[0], a1[1] | a2[1]

    def row_counts(self, tq: int, tk: int, causal: bool):
        """Keys of A1, A2 and of both for every query row, in closed form: three [Tq] int64
        tensors (O(T), for long sequences; the test counts the loop-built pattern)."""
        l, c = self.stride, self.summary
        p = torch.arange(tq, dtype=torch.int64) + (tk - tq)  # query positions
        hi = p if causal else torch.full_like(p, tk - 1)  # the last key a row may see
        one = torch.ones_like(p)
        if self.pattern == "strided":
            a1 = torch.minimum(hi, p + l) - (p - l).clamp_min(0) + 1
            a2 = p // l + 1 + (hi - p) // l
            both = one + (p - l >= 0).long() + (p + l <= hi).long()
        else:
            def summaries(n):  # j in [0, n) with j mod l >= l - c
                return (n // l) * c + (n % l - (l - c)).clamp_min(0)

            start = (p // l) * l
            end = torch.minimum(torch.minimum(start + l - 1, torch.full_like(p, tk - 1)), hi)
            a1 = end - start + 1
            a2 = summaries(hi + 1)
            both = summaries(end + 1) - summaries(start)
        return a1, a2, both

    def cost(self, tq, tk, causal) -> Cost:
        if tq > tk:  # queries before the first key (rare): count the materialised pattern
            mod = self.mask_mod(torch.empty(1, 1, tq, 1), torch.empty(1, 1, tk, 1), causal)
            mod = masks.and_masks(mod, masks.causal(tk - tq)) if causal else mod
            pairs = float(masks.materialize(mod, 1, self.num_heads, tq, tk).sum()) / self.num_heads
        else:
            a1, a2, both = (float(x.sum()) for x in self.row_counts(tq, tk, causal))
            if self.heads == "merged":
                pairs = a1 + a2 - both
            else:
                even = (self.num_heads + 1) // 2
                pairs = (even * a1 + (self.num_heads - even) * a2) / self.num_heads
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        return Cost(flops=4.0 * self.num_heads * pairs * self.head_dim, density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)
