"""Attention recall: how much of dense attention's probability mass falls on the keys a method
computes, beside the share of keys it computes (its density).

For a query row i with dense probabilities p_ij = softmax_j(q_i . k_j / sqrt(D)) over the keys
it may see (causal), and C_i the set of keys the method computes for it:
    recall_i = sum_{j in C_i} p_ij,      density_i = |C_i| / |allowed keys of i|,
averaged over rows, heads and batch. A sparse method that keeps the mass has recall near 1 at a
low density; dense attention has recall 1 at density 1.
"""
from __future__ import annotations

import math

import torch


def dense_probabilities(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """Softmax attention probabilities [B, H, Tq, Tk] in fp32 (K heads shared by query groups)."""
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    kk = k.repeat_interleave(H // Hkv, dim=1) if H != Hkv else k
    s = torch.matmul(q.float(), kk.float().transpose(-1, -2)) / math.sqrt(D)
    if causal:
        tq, tk = q.shape[2], k.shape[2]
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1)


def attention_recall(q, k, computed: torch.Tensor, causal: bool) -> dict:
    """``computed`` [B, H, Tq, Tk] bool (True: the method computes that pair) -> recall and
    density, each averaged over rows; also the worst row's recall."""
    p = dense_probabilities(q, k, causal)
    computed = computed.expand_as(p)
    per_row = (p * computed).sum(-1)
    tq, tk = p.shape[-2:]
    allowed = (torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq) if causal
               else torch.ones(tq, tk, dtype=torch.bool, device=q.device))
    density = (computed & allowed).sum(-1).float() / allowed.sum(-1).float()
    return {"recall": float(per_row.mean()), "recall_min": float(per_row.min()), "density": float(density.mean())}


def method_recall(method, q, k, causal: bool) -> dict | None:
    """Recall of a method on captured q/k, or None when the method does not choose keys."""
    computed = method.computed_keys(q, k, causal)
    return None if computed is None else attention_recall(q, k, computed, causal)
