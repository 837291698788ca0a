"""Star Attention: blockwise-local context encoding with an anchor block, then global query.

Acharya, Jia and Ginsburg, "Star Attention: Efficient LLM Inference over Long Sequences"
(2024, arXiv 2411.17116), Sec. 2, Eq. (1)-(2) and Fig. 1. Causal only (an LLM's prefill).

The prompt is a context of C = Tk - ``query_len`` tokens followed by the query (the last
``query_len`` tokens). The context is cut into blocks c_1, c_2, ... of ``block_size`` tokens,
spread over ``num_hosts`` emulated hosts (one block each by default: block_size =
ceil(C / num_hosts)).

Phase 1 (context encoding): each block c_i is prefixed with the anchor block, the first
``anchor_size`` tokens of the context (c_1 at its own positions), so a context token at
position p in block i attends causally to

    keys in its own block up to p,  plus  keys 0 .. anchor_size - 1

(the anchor's own keys are discarded after the block is encoded: only c_i's keys are cached).
Phase 2 (query encoding): every query token attends to every earlier token (the whole
context cache and the query), exactly, as the paper's distributed softmax over hosts
(Eq. 1-2) is exact. Decode steps (generation) are phase 2 too: models decode densely.

Defaults follow the paper and the official repository's runs: four hosts, anchor block as
large as the context block (block size one quarter of the sequence in its RULER table). The
query length is not a parameter of the paper (it is the question's length): 64 is this
module's choice. With block_size >= C the method is exact causal attention.
The pattern depends on the shape only (``static_mask``); ``impl=triton`` visits the tiles of
``methods.kernels.block_sparse`` when the blocks, the anchor and the query start fall on
tile boundaries (tile gcd(block, anchor, C, 64) >= 16), else the flex path runs.
Across processes, each rank one host: ``methods.star_distributed.star_attention_distributed``
(the same output; tested with gloo processes on the CPU, not yet run on several GPUs).
"""
from __future__ import annotations

import math

import torch

from methods import masks
from methods.base import Cost, SparseMethod


class StarAttention(SparseMethod):
    name = "star_attention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Acharya et al. 2024"
    kind = "sparse (block-local + anchor)"
    official_test = None
    supports_noncausal = False
    static_mask = True
    impls = ("reference", "flex", "triton")
    triton_backward = True  # the block-sparse kernel has one

    def __init__(self, num_hosts: int = 4, block_size: int | None = None, anchor_size: int | None = None,
                 query_len: int = 64, impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        if not isinstance(num_hosts, int) or num_hosts < 1:
            raise ValueError(f"StarAttention: num_hosts must be an integer >= 1, got {num_hosts!r}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"StarAttention: block_size must be an integer >= 1 or None, got {block_size!r}")
        if anchor_size is not None and (not isinstance(anchor_size, int) or anchor_size < 0):
            raise ValueError(f"StarAttention: anchor_size must be an integer >= 0 or None, got {anchor_size!r}")
        if not isinstance(query_len, int) or query_len < 0:
            raise ValueError(f"StarAttention: query_len must be an integer >= 0, got {query_len!r}")
        self.num_hosts, self.block_size, self.anchor_size = num_hosts, block_size, anchor_size
        self.query_len = query_len

    def split(self, tk: int) -> tuple[int, int, int]:
        """(context length C, context block size, anchor size) for a prompt of tk tokens."""
        C = max(0, tk - self.query_len)
        bs = self.block_size or max(1, math.ceil(C / self.num_hosts))
        anchor = bs if self.anchor_size is None else self.anchor_size
        return C, bs, anchor

    def mask_mod(self, q, k, causal):
        tk = k.shape[2]
        off = tk - q.shape[2]
        C, bs, anchor = self.split(tk)

        def star_mask(b, h, q_idx, kv_idx):
            p = q_idx + off
            start = (p // bs) * bs  # the first key of the query's context block
            return (p >= C) | (kv_idx >= start) | (kv_idx < anchor)

        return star_mask

    def flex_layout(self, q, k, causal, block):
        """At FlexAttention's ``block``: a block is touched where some query of it is a query
        token (p >= C), or reaches back to its context block's start, or the block holds
        anchor keys; wholly kept where one of the three holds for all its pairs (the start
        of a query's context block grows with it: the extremes are the block's ends)."""
        tq, tk = q.shape[2], k.shape[2]
        C, bs, anchor = self.split(tk)
        nq, nk = math.ceil(tq / block), math.ceil(tk / block)
        ps = torch.arange(nq, device=q.device).view(nq, 1) * block + (tk - tq)
        pe = torch.clamp(ps + block - 1, max=tk - 1)
        ks = torch.arange(nk, device=q.device).view(1, nk) * block
        ke = torch.clamp(ks + block - 1, max=tk - 1)
        any_ = (pe >= C) | (ke >= (ps // bs) * bs) | (ks < anchor)
        full = (ps >= C) | (ks >= (pe // bs) * bs) | (ke < anchor)
        return any_, full

    def triton_attend(self, q, k, v, causal, key_padding_mask):
        from methods.kernels import block_sparse as bsk

        T = q.shape[2]
        C, bs, anchor = self.split(T)
        t = math.gcd(bs, C, anchor if anchor else bs, 64)
        if t < 16:
            return None  # pattern edges inside tiles: the flex path
        key = (T, t, str(q.device))
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans:
            plans.clear()
            n = math.ceil(T / t)
            r = torch.arange(n, device=q.device).view(n, 1) * t  # first position of each query tile
            c = torch.arange(n, device=q.device).view(1, n) * t  # first key of each key tile
            lay = ((r >= C) | (c >= (r // bs) * bs) | (c < anchor)) & (c <= r)
            plans[key] = bsk.inside_first(*bsk.layout_to_lists(lay.view(1, 1, n, n)), block_m=t, block_n=t,
                                          causal=True, tq=T, tk=T)
        idx, cnt, nin = plans[key]
        out = bsk.block_sparse_attention(q, k, v, idx, cnt, nin=nin, block_m=t, block_n=t, causal=True,
                                         key_padding_mask=key_padding_mask)
        return out, bsk.tile_work(cnt, t, t, q.shape[0], q.shape[1])

    def pairs(self, tq: int, tk: int) -> float:
        """Kept (query, key) pairs per head, exact: phase-2 rows see every earlier key, phase-1
        rows their block up to themselves plus the anchor keys before their block."""
        C, bs, anchor = self.split(tk)
        p = torch.arange(tk - tq, tk, dtype=torch.float64)
        start = torch.div(p, bs, rounding_mode="floor") * bs
        phase1 = (p - start + 1) + torch.clamp(start, max=anchor)
        return float(torch.where(p >= C, p + 1, phase1).sum())

    def cost(self, tq, tk, causal) -> Cost:
        dense_pairs = masks.causal_pairs(tq, tk)
        pairs = self.pairs(tq, tk)
        return Cost(flops=4.0 * self.num_heads * pairs * self.head_dim, density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)
