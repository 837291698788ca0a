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


def _row_mask(method, q, k, causal: bool):
    """rows -> [B, H, R, Tk] bool: the keys ``method`` computes for the query rows ``rows``
    (before causality), without the [Tq, Tk] map where the method is a mask function
    (``SparseMethod.mask_mod``, evaluated on the rows only); else its ``computed_keys`` up to
    2**31 pairs, rows taken from it; None where neither applies."""
    from methods.base import SparseMethod

    B, H, tq, _ = q.shape
    tk = k.shape[2]
    if isinstance(method, SparseMethod) and type(method).computed_keys is SparseMethod.computed_keys:
        mod = method.mask_mod(q, k, causal)
        b = torch.arange(B, device=q.device).view(B, 1, 1, 1)
        h = torch.arange(H, device=q.device).view(1, H, 1, 1)
        kv = torch.arange(tk, device=q.device).view(1, 1, 1, tk)
        return lambda rows: mod(b, h, rows.view(1, 1, -1, 1), kv).expand(B, H, len(rows), tk)
    if B * H * tq * tk > 2**31:
        return None
    full = method.computed_keys(q, k, causal)
    return None if full is None else (lambda rows: full.expand(B, H, tq, tk)[:, :, rows])


@torch.no_grad()
def sampled_recall(method, q, k, causal: bool, rows: int = 1024, chunk: int = 128) -> dict | None:
    """Recall and density as ``attention_recall`` defines them, averaged over ``rows`` query rows
    spread evenly over the sequence (every row where Tq <= rows), row chunk by row chunk: memory
    O(chunk * Tk), so that it runs at 128k tokens. None when the method does not choose keys, or
    chooses them only through a map too large to build."""
    B, H, tq, D = q.shape
    tk, Hkv = k.shape[2], k.shape[1]
    mask_rows = _row_mask(method, q, k, causal)
    if mask_rows is None:
        return None
    idx = torch.linspace(0, tq - 1, min(int(rows), tq), device=q.device).round().long().unique()
    kk = (k.repeat_interleave(H // Hkv, dim=1) if H != Hkv else k).float()
    kv = torch.arange(tk, device=q.device)
    recall, density = [], []
    for c in idx.split(int(chunk)):
        s = torch.matmul(q[:, :, c].float(), kk.transpose(-1, -2)) / math.sqrt(D)  # [B, H, R, Tk]
        allowed = (kv.view(1, -1) <= (c + tk - tq).view(-1, 1)) if causal else torch.ones(
            len(c), tk, dtype=torch.bool, device=q.device)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        comp = mask_rows(c) & allowed
        recall.append((p * comp).sum(-1).flatten(0, 1))
        density.append((comp.sum(-1).float() / allowed.sum(-1).float()).flatten(0, 1))
    r, d = torch.cat(recall, -1), torch.cat(density, -1)
    return {"recall": float(r.mean()), "recall_min": float(r.min()), "density": float(d.mean()),
            "rows": int(len(idx))}
