"""NSA's compression-to-selection importance (Yuan et al. 2025, Eq. 9) against a direct computation.

Eq. 9 is computed here by looping over token ranges: compressed block i covers tokens
i*d .. i*d + l - 1, selection block j tokens j*l' .. (j+1)*l' - 1, and block i's probability
counts once for every stride of d tokens the two share (for l=32, d=16, l'=64: 1, 2, 2, 2, 1).
The reference (PyTorch) and the Triton path (in the interpreter on the CPU, fp32) are compared
against it, with the compressed attention probabilities also computed here.
"""
from __future__ import annotations

import math

import pytest
import torch

import methods

# (l, d, l'): d = l and d = l/2, l' = 2l and 4l, and l' = l
CASES = [(16, 16, 32), (16, 8, 32), (16, 8, 64), (16, 16, 64), (32, 16, 64), (16, 8, 16)]


def eq9_weights(n: int, T: int, l: int, d: int, lsel: int) -> torch.Tensor:
    """[n, nsel]: tokens shared by compressed block i and selection block j, over d."""
    nsel = math.ceil(T / lsel)
    w = torch.zeros(n, nsel, dtype=torch.float64)
    for i in range(n):
        for t in range(i * d, i * d + l):
            w[i, t // lsel] += 1.0 / d
    return w


def compressed_probs(q, kc, l, d):
    """Compressed attention probabilities [B, H, T, n]: query t sees the blocks ending at or before t."""
    T, n = q.shape[2], kc.shape[2]
    ends = torch.tensor([i * d + l - 1 for i in range(n)])
    vis = ends.view(1, n) <= torch.arange(T).view(T, 1)
    kk = kc.double().repeat_interleave(q.shape[1] // kc.shape[1], 1)
    s = (q.double() @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)


def test_eq9_weights_of_the_paper_configuration():
    """l=32, d=16, l'=64: selection block 1 (tokens 64..127) takes compressed blocks 3..7 with
    weights 1, 2, 2, 2, 1 (the paper's m + n pair counts)."""
    w = eq9_weights(10, 192, 32, 16, 64)
    assert w[:, 1].tolist() == [0, 0, 0, 1, 2, 2, 2, 1, 0, 0]
    m = methods.load("nsa", num_heads=2, num_kv_heads=1, head_dim=16, compress_block=32, compress_stride=16,
                     block_size=64)
    torch.testing.assert_close(m.block_importance(torch.eye(10, dtype=torch.float64), 3), w, rtol=0, atol=0)


@pytest.mark.parametrize("l,d,lsel", CASES)
def test_reference_importance_is_eq9(l, d, lsel):
    T = 4 * lsel + 5
    n = (T - l) // d + 1
    p = torch.rand(2, 3, 7, n, dtype=torch.float64, generator=torch.Generator().manual_seed(l + d + lsel))
    m = methods.load("nsa", num_heads=2, num_kv_heads=1, head_dim=16, compress_block=l, compress_stride=d,
                     block_size=lsel)
    nsel = math.ceil(T / lsel)
    torch.testing.assert_close(m.block_importance(p, nsel), p @ eq9_weights(n, T, l, d, lsel))


@pytest.mark.parametrize("l,d,lsel", CASES)
def test_reference_selection_follows_eq9(l, d, lsel):
    """The whole reference chain (compression, probabilities summed over the group, Eq. 9, top-n)
    against the same chain written here: the selected blocks agree."""
    B, H, Hkv, T, D = 1, 4, 2, 6 * lsel + 7, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    m = methods.load("nsa", num_heads=H, num_kv_heads=Hkv, head_dim=D, compress_block=l, compress_stride=d,
                     block_size=lsel, num_selected=5, impl="reference").double()
    kc, _ = m.compressed_kv(k, v)
    p = compressed_probs(q, kc, l, d).view(B, Hkv, H // Hkv, T, -1).sum(2)
    imp = p @ eq9_weights(kc.shape[2], T, l, d, lsel)  # [B, Hkv, T, nsel]
    t = torch.arange(T).view(T, 1)
    j = torch.arange(imp.shape[-1]).view(1, -1)
    cur = t // lsel
    imp = imp.masked_fill((j == 0) | (j == cur) | (j == cur - 1), float("inf")).masked_fill(j > cur, float("-inf"))
    want = imp.sort(dim=-1, descending=True, stable=True).indices[..., :5]
    want = torch.where(want <= cur, want, -1)
    _, sel = m._compressed(q, k, v)
    assert torch.equal(sel, want)


@pytest.mark.parametrize("l,d,lsel", CASES)
def test_triton_importance_is_eq9(l, d, lsel):
    from methods.kernels import nsa_compressed

    B, H, Hkv, D = 1, 4, 2, 16
    T = max(3 * lsel + 7, 80)
    n = (T - l) // d + 1
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, H, T, D, generator=g)
    kc, vc = (torch.randn(B, Hkv, n, D, generator=g) for _ in range(2))
    _, imp = nsa_compressed.nsa_compressed(q, kc, vc, lsel, l, d)
    p = compressed_probs(q, kc, l, d).view(B, Hkv, H // Hkv, T, n).sum(2)
    want = (p @ eq9_weights(n, T, l, d, lsel)).float()
    torch.testing.assert_close(imp, want, rtol=1e-5, atol=1e-5)
    for atomic in (0, 1):  # tiles of 16 compressed blocks: several tiles per row, added up
        _, lse = nsa_compressed.nsa_compressed_attention(q, kc, vc, l, d, launch=(16, 16, 4, 2))
        imp16 = nsa_compressed.nsa_importance(q, kc, lse, lsel, l, d, 0, T, launch=(16, 16, 4, 2, atomic))
        torch.testing.assert_close(imp16, want, rtol=1e-5, atol=1e-5)
