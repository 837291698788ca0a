"""H2O: keep the heavy hitters (tokens of largest accumulated attention) and the recent tokens.

Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Re, Barrett, Wang, Chen, "H2O: Heavy-Hitter
Oracle for Efficient Generative Inference of Large Language Models" (NeurIPS 2023), Sec. 3.2,
Alg. 1; official code FMInference/H2O (``h2o_hf/utils_lm_eval/modify_llama.py``: heavy and
recent budgets, ``heavy_ratio = recent_ratio = 0.1``).

With the causal softmax attention P [L, L] of each query head over the prefill:

    A_j = sum_i P_ij            (accumulated attention of token j over every prefill query)

the query heads of a KV head averaged (GQA; the official code has one KV head per query head
and sums over the batch too: here each batch element ranks its own). Each (batch, KV head)
keeps its ``r = int(n * recent_share)`` most recent tokens and the n - r other tokens of
largest A, n = max(1, int(L (1 - ratio))) tokens in all; the official code's equal heavy and
recent ratios give the default recent_share 0.5. (kvpress's ObservedAttentionPress divides
A_j by the L - j queries that see token j and keeps no recent share: not this rule.) As a
press the eviction is done once, after the prefill; the
paper also evicts at each decode step (not done here: decode tokens are appended and kept).
"""
from __future__ import annotations

import math

import torch

from methods.base import AttentionInputError
from methods.decode import KVCache
from methods.press import Press


class H2O(Press):
    name = "h2o"
    # what the README's method table says (python -m analysis.readme)
    paper = "Zhang et al. 2023"
    official_test = None

    def __init__(self, ratio: float = 0.5, recent_share: float = 0.5, impl: str = "reference", **structural):
        super().__init__(ratio=ratio, impl=impl, **structural)
        if not 0.0 <= recent_share <= 1.0:
            raise ValueError(f"H2O: recent_share must be in [0, 1], got {recent_share}")
        self.recent_share = float(recent_share)

    def decode_params(self) -> dict:
        return {"ratio": self.ratio, "recent_share": self.recent_share}

    def scores(self, cache: KVCache, q) -> torch.Tensor:
        if q is None:
            raise AttentionInputError("H2O: the press needs the prefill's queries (accumulated attention)")
        k = cache.keys().float()
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        s = q.float().view(B, Hkv, H // Hkv, L, D) @ k.unsqueeze(2).transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        acc = torch.softmax(s, dim=-1).sum(-2).mean(2)  # [B, Hkv, L]
        r = int(self.budget(L) * self.recent_share)
        if r:
            acc[..., L - r:] = float("inf")
        return acc


__all__ = ["H2O"]
