"""What the decode tests (tests/test_decode*.py) share: the grouped-query shape, seeded q/k/v
(isotropic, or with anisotropic keys), a method at that shape, exact single-head attention
written here (independent of ``methods``), and a prefill-then-decode loop."""
from __future__ import annotations

import math

import torch

import methods
from tests.conftest import seeded_qkv

B, H, HKV, D = 2, 4, 2, 16
G = H // HKV


def qkv(T, seed=0, dtype=torch.float64, anisotropic=False):
    """q [B, H, T, D], k, v [B, HKV, T, D] drawn N(0, 1) with a seeded generator; ``anisotropic``:
    keys with distinct variances (3 down to 0.2) along a fixed random basis per KV head (well
    separated principal components, for Loki) and queries scaled by 1.5."""
    if not anisotropic:
        return seeded_qkv(B=B, H=H, Hkv=HKV, T=T, D=D, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.2, D, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(HKV, D, D, generator=torch.Generator().manual_seed(99),
                                        dtype=torch.float64))[0]  # the same basis for every seed
    k = (torch.randn(B, HKV, T, D, generator=g, dtype=torch.float64) * scales) @ basis.transpose(-1, -2).unsqueeze(0)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(B, HKV, T, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def load(name, **kw):
    """Method ``name`` at the shared shape (H query heads over HKV KV heads, head dim D)."""
    return methods.load(name, num_heads=H, head_dim=D, num_kv_heads=HKV, max_seq_len=512, **kw)


def softmax_attend(q, keys, values, idx=None):
    """One query head, exact: q [D] over keys, values [n, D] (those at ``idx`` when given)."""
    if idx is not None:
        idx = sorted(idx)
        keys, values = keys[idx], values[idx]
    return torch.softmax(keys @ q / math.sqrt(q.shape[-1]), 0) @ values


def dense_row(q, k, v, i, b, h):
    """Dense decode of query head h of batch b at position i over keys 0 ... i."""
    return softmax_attend(q[b, h, i], k[b, h // G, :i + 1], v[b, h // G, :i + 1])


def steps(path, q, k, v, L):
    """Prefill L tokens through ``path``, decode the rest; yields (position, output, cache)."""
    cache = path.new_cache(q.shape[0], q.shape[2], q.dtype)
    path.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
    for i in range(L, q.shape[2]):
        yield i, path.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache), cache
