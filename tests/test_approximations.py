"""Performer, Linformer, Nystromformer: tested by their mathematics (float64, seeded)."""
import math

import pytest
import torch
from torch.func import functional_call

import methods
from methods.base import AttentionInputError, masked_attention
from methods.nystrom import iterative_pinv, segment_means
from methods.performer import iid_gaussian, orthogonal_gaussian, positive_features
from tests.conftest import seeded_qkv

F64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- Performer ------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [iid_gaussian, orthogonal_gaussian])
def test_positive_features_estimate_softmax_kernel_unbiasedly(sampler):
    g = torch.Generator().manual_seed(0)
    d = 8
    x = torch.randn(d, generator=g, dtype=F64) * 0.4
    y = torch.randn(d, generator=g, dtype=F64) * 0.4
    est = []
    for _ in range(3000):
        w = sampler(8, d, g)  # one block of d features per draw
        est.append(float(positive_features(x, w) @ positive_features(y, w)))
    est = torch.tensor(est, dtype=F64)
    true = math.exp(float(x @ y))
    stderr = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - true) < 4 * stderr, (float(est.mean()), true, stderr)


def test_orthogonal_rows_are_orthogonal_within_blocks():
    w = orthogonal_gaussian(32, 16, torch.Generator().manual_seed(1))
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16, dtype=F64), atol=1e-10, rtol=0)


def test_performer_error_falls_as_one_over_sqrt_m():
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=64, D=16)
    q, k = q * 0.3, k * 0.3  # moderate logits: the estimator's variance regime, not its tails
    exact = masked_attention(q, k, v)
    ms = [64, 256, 1024, 4096]
    errs = []
    for m in ms:
        e = [rel(methods.load("performer", num_heads=2, head_dim=16, num_features=m, orthogonal=False,
                              feature_seed=s)(q, k, v), exact) for s in range(8)]
        errs.append(sum(e) / len(e))
    slope = (math.log(errs[-1]) - math.log(errs[0])) / (math.log(ms[-1]) - math.log(ms[0]))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert -0.7 < slope < -0.35, (slope, errs)  # 1/sqrt(m) is a slope of -0.5


def _masked_feature_attention(m, q, k, v):
    """Causal feature-map attention as an explicit masked T x T computation."""
    fq, fk = m.features(q, True), m.features(k, False)
    a = fq @ fk.transpose(-1, -2)  # [B, H, Tq, Tk]
    tq, tk = a.shape[-2:]
    mask = torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)
    a = a * mask
    return (a @ v) / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("tq,tk", [(63, 63), (20, 63), (1, 9)])
def test_causal_performer_equals_masked_feature_attention(kernel, tq, tk):
    q, k, v = seeded_qkv(B=2, H=2, Hkv=2, T=tq, tk=tk, D=16)
    ref = methods.load("performer", num_heads=2, head_dim=16, num_features=32, kernel=kernel,
                       impl="reference")
    want = _masked_feature_attention(ref, q, k, v)
    torch.testing.assert_close(ref(q, k, v, causal=True), want, rtol=1e-9, atol=1e-10)
    for c in (1, 7, 16, 64, 100):
        fast = methods.load("performer", num_heads=2, head_dim=16, num_features=32, kernel=kernel,
                            impl="chunked", chunk_size=c)
        torch.testing.assert_close(fast(q, k, v, causal=True), want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_performer_triton_path_equals_the_reference(dtype, tol):
    """impl=triton (Triton's interpreter here) against impl=reference, GQA and padding included."""
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=63, D=16, dtype=torch.float32)
    kpm = torch.ones(2, 63, dtype=torch.bool)
    kpm[1, 50:] = False
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, num_features=24)
    fast = methods.load("performer", impl="triton", **kw)
    ref = methods.load("performer", impl="reference", **kw)
    for pad in (None, kpm):
        with torch.no_grad():
            got = fast(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, key_padding_mask=pad)
            want = ref(q, k, v, causal=True, key_padding_mask=pad)
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_performer_gqa_and_padding():
    q, k, v = seeded_qkv(B=2, H=4, Hkv=1, T=33, D=16)
    m = methods.load("performer", num_heads=4, head_dim=16, num_features=64)
    kpm = torch.ones(2, 33, dtype=torch.bool)
    kpm[1, 20:] = False
    out = m(q, k, v, key_padding_mask=kpm)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 20:] += 5
    v2[1, :, 20:] -= 7
    torch.testing.assert_close(m(q, k2, v2, key_padding_mask=kpm), out)
    out1 = m(q[1:, :, :], k[1:, :, :20], v[1:, :, :20])
    torch.testing.assert_close(out[1:], out1)


def test_performer_features_fixed_in_eval_redrawn_in_training():
    m = methods.load("performer", num_heads=2, head_dim=8, num_features=16, redraw_interval=2)
    m2 = methods.load("performer", num_heads=2, head_dim=8, num_features=16, redraw_interval=2)
    torch.testing.assert_close(m.projection, m2.projection)  # seeded
    assert "projection" in dict(m.named_buffers()) and not list(m.parameters())
    q = torch.randn(1, 2, 5, 8)
    w0 = m.projection.clone()
    m.eval()
    for _ in range(5):
        m(q, q, q)
    torch.testing.assert_close(m.projection, w0)
    m.train()
    seen = []
    for _ in range(5):
        m(q, q, q)
        seen.append(m.projection.clone())
    assert torch.equal(seen[0], w0) and torch.equal(seen[1], w0)
    assert not torch.equal(seen[2], w0) and torch.equal(seen[2], seen[3])


def test_performer_stabiliser_survives_large_inputs():
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=40, D=16, dtype=torch.float32)
    m = methods.load("performer", num_heads=2, head_dim=16, num_features=64)
    out = m(q * 30, k * 30, v, causal=True)
    assert torch.isfinite(out).all()


# ---- Linformer ------------------------------------------------------------------------
def test_linformer_with_identity_projections_is_exact():
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=32, D=16)
    m = methods.load("linformer", num_heads=4, head_dim=16, num_kv_heads=2, max_seq_len=32,
                     proj_len=32, sharing="none").double()
    with torch.no_grad():
        m.E.copy_(torch.eye(32).expand_as(m.E))
        m.F.copy_(torch.eye(32).expand_as(m.F))
    torch.testing.assert_close(m(q, k, v), masked_attention(q, k, v))


def test_linformer_shorter_input_is_zero_padding():
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=20, D=8)
    m = methods.load("linformer", num_heads=2, head_dim=8, max_seq_len=48, proj_len=12).double()
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, 28))  # noqa: E731
    torch.testing.assert_close(m(q, k, v), m(q, pad(k), pad(v)))
    with pytest.raises(AttentionInputError, match="exceeds max_seq_len=48"):
        m(*seeded_qkv(B=1, H=2, Hkv=2, T=49, D=8))


def test_linformer_refuses_causal():
    m = methods.load("linformer", num_heads=2, head_dim=8, max_seq_len=16, proj_len=4)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(AttentionInputError, match="not causal"):
        m(q, q, q, causal=True)


def test_linformer_sharing_options():
    n = lambda **kw: sum(p.numel() for p in methods.load(  # noqa: E731
        "linformer", num_heads=4, head_dim=8, max_seq_len=16, proj_len=4, **kw).parameters())
    assert n(sharing="none") == 2 * 4 * 4 * 16
    assert n(sharing="headwise") == 2 * 4 * 16
    assert n(sharing="kv") == n(sharing="layerwise") == 4 * 16
    a = methods.load("linformer", num_heads=2, head_dim=8, max_seq_len=16, proj_len=4, sharing="layerwise")
    b = methods.load("linformer", num_heads=2, head_dim=8, max_seq_len=16, proj_len=4, sharing="layerwise")
    b.share_parameters_with(a)
    assert b.E is a.E
    with pytest.raises(ValueError, match="sharing must be one of"):
        methods.load("linformer", sharing="everything")


# ---- Nystromformer --------------------------------------------------------------------
def test_nystrom_with_a_landmark_per_token_is_exact():
    q, k, v = seeded_qkv(B=2, H=2, Hkv=2, T=16, D=16)
    m = methods.load("nystrom", num_heads=2, head_dim=16, num_landmarks=16, pinv_iters=60,
                     conv_kernel=0)
    torch.testing.assert_close(m(q, k, v), masked_attention(q, k, v), rtol=1e-7, atol=1e-8)


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    a = torch.softmax(torch.randn(3, 12, 12, dtype=F64, generator=torch.Generator().manual_seed(3)), -1)
    torch.testing.assert_close(iterative_pinv(a, 40), torch.linalg.pinv(a), rtol=1e-6, atol=1e-8)


def test_nystrom_error_shrinks_with_landmarks():
    """With the paper's 6 iterations (which also regularise an ill-conditioned A: with the
    exact pseudo-inverse the error on random inputs is far larger at some m)."""
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=64, D=16)
    exact = masked_attention(q, k, v)
    errs = [rel(methods.load("nystrom", num_heads=2, head_dim=16, num_landmarks=m,
                             conv_kernel=0)(q, k, v), exact) for m in (4, 16, 32, 64)]
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 0.1, errs


def test_segment_means_pad_odd_lengths_with_a_mask():
    x = torch.arange(7, dtype=F64).view(1, 1, 7, 1)
    means, live = segment_means(x, 3)  # segments [0 1 2] [3 4 5] [6]
    torch.testing.assert_close(means.flatten(), torch.tensor([1.0, 4.0, 6.0], dtype=F64))
    assert live.all()
    valid = torch.tensor([[True] * 5 + [False] * 2])
    means, live = segment_means(x, 3, valid)
    torch.testing.assert_close(means.flatten()[:2], torch.tensor([1.0, 3.5], dtype=F64))
    assert live.flatten().tolist() == [True, True, False]


@pytest.mark.parametrize("T,m", [(63, 8), (5, 64), (100, 64)])
def test_nystrom_odd_lengths_and_padding(T, m):
    q, k, v = seeded_qkv(B=2, H=2, Hkv=1, T=T, D=8)
    nys = methods.load("nystrom", num_heads=2, head_dim=8, num_landmarks=m, conv_kernel=3).double()
    kpm = torch.ones(2, T, dtype=torch.bool)
    kpm[1, T // 2:] = False
    out = nys(q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    k2, v2 = k.clone(), v.clone()
    k2[1, :, T // 2:] = 9.0
    v2[1, :, T // 2:] = -9.0
    torch.testing.assert_close(nys(q, k2, v2, key_padding_mask=kpm), out)


def test_nystrom_refuses_causal():
    m = methods.load("nystrom", num_heads=2, head_dim=8)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(AttentionInputError, match="causal"):
        m(q, q, q, causal=True)


# ---- gradients against finite differences ---------------------------------------------
def _gradcheck(m, causal, params=()):
    m = m.double()
    q, k, v = (t.requires_grad_() for t in seeded_qkv(B=1, H=2, Hkv=1, T=9, D=4))
    ps = [dict(m.named_parameters())[p].detach().clone().requires_grad_() for p in params]

    def f(q, k, v, *ps):
        return functional_call(m, dict(zip(params, ps)), (q, k, v), {"causal": causal})

    assert torch.autograd.gradcheck(f, (q, k, v, *ps), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl,causal", [("reference", False), ("reference", True), ("chunked", True)])
def test_performer_gradcheck(impl, causal):
    _gradcheck(methods.load("performer", num_heads=2, head_dim=4, num_features=8, impl=impl,
                            chunk_size=4), causal)


@pytest.mark.parametrize("sharing,params", [("none", ("E", "F")), ("kv", ("E",))])
def test_linformer_gradcheck(sharing, params):
    _gradcheck(methods.load("linformer", num_heads=2, head_dim=4, num_kv_heads=1, max_seq_len=12,
                            proj_len=5, sharing=sharing), False, params)


def test_nystrom_gradcheck():
    _gradcheck(methods.load("nystrom", num_heads=2, head_dim=4, num_landmarks=3, pinv_iters=6,
                            conv_kernel=3), False, ("conv.weight",))
