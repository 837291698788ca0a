"""The dense baseline: reference and SDPA paths agree to fp32 precision."""
import pytest
import torch

import methods
from methods.base import masked_attention
from tests.conftest import seeded_qkv


def naive(q, k, v, causal, kpm=None):
    """Independent loop-free textbook attention in float64 (no shared helpers)."""
    B, H, tq, D = q.shape
    tk = k.shape[2]
    rep = H // k.shape[1]
    k = k.repeat_interleave(rep, 1).double()
    v = v.repeat_interleave(rep, 1).double()
    s = q.double() @ k.transpose(-1, -2) / D**0.5
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)
    allowed = allowed.expand(B, 1, tq, tk)
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("T,tk", [(63, 63), (17, 63), (1, 40)])
def test_reference_and_sdpa_match_naive(causal, H, Hkv, T, tk):
    q, k, v = seeded_qkv(B=2, H=H, Hkv=Hkv, T=T, tk=tk, dtype=torch.float32)
    want = naive(q, k, v, causal)
    for impl in ("reference", "sdpa"):
        m = methods.load("dense", impl=impl, num_heads=H, head_dim=16)
        got = m(q, k, v, causal=causal)
        assert got.shape == q.shape and got.dtype == q.dtype
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(causal):
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=63, dtype=torch.float32)
    kpm = torch.ones(2, 63, dtype=torch.bool)
    kpm[0, 50:] = False  # right padding
    kpm[1, :5] = False  # left padding: the first causal queries see nothing
    want = naive(q, k, v, causal, kpm)
    for impl in ("reference", "sdpa"):
        got = methods.load("dense", impl=impl, num_heads=4, head_dim=16)(
            q, k, v, causal=causal, key_padding_mask=kpm)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # padded keys have no influence at all
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 50:] = 1e3
    v2[0, :, 50:] = -1e3
    got2 = methods.load("dense", num_heads=4, head_dim=16)(q, k2, v2, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(got2[0], methods.load("dense", num_heads=4, head_dim=16)(
        q, k, v, causal=causal, key_padding_mask=kpm)[0])


def test_masked_attention_float64():
    q, k, v = seeded_qkv()
    assert masked_attention(q, k, v).dtype == torch.float64
    torch.testing.assert_close(masked_attention(q, k, v), naive(q, k, v, False))


def test_sdpa_backend_is_named():
    m = methods.load("dense", num_heads=4, head_dim=16)
    q, k, v = seeded_qkv(dtype=torch.float32)
    assert m.describe(q, k, v, causal=True)["backend"].startswith("sdpa:")
    assert methods.load("dense", impl="reference", num_heads=4, head_dim=16).describe(
        q, k, v, True)["backend"] == "explicit-fp32"


def test_cost_counts_causal_pairs():
    m = methods.load("dense", num_heads=2, head_dim=8)
    full = m.cost(10, 10, False)
    causal = m.cost(10, 10, True)
    assert full.flops == 4 * 2 * 100 * 8
    assert causal.flops == 4 * 2 * 55 * 8
    assert full.density == causal.density == 1.0


def test_window_pairs_counts_the_materialised_window():
    from methods import masks

    for p0, p1, w in [(0, 10, 3), (2, 9, 1), (5, 5, 4), (0, 7, 20), (6, 30, 7)]:
        band = masks.materialize(masks.and_masks(masks.sliding_window(w), masks.causal()), 1, 1, p1, p1)[0, 0]
        assert masks.window_pairs(p0, p1, w) == int(band[p0:p1].sum()), (p0, p1, w)
