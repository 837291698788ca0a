"""methods/kernels/lightning.py (Lightning Attention's causal tiled product in Triton, run under
TRITON_INTERPRET=1 here) against the explicit decayed matrix written in the test:
O = (Q K^T (.) M) V, M_ij = lambda^(i-j) for j <= i, else 0."""
import math

import pytest
import torch

from methods.kernels import lightning as kern


def explicit(q, k, v, log_decay):
    T = q.shape[2]
    i = torch.arange(T, dtype=torch.float64)
    diff = i[:, None] - i[None, :]
    out = torch.empty(q.shape[:3] + v.shape[-1:], dtype=torch.float64)
    for h in range(q.shape[1]):
        lam = math.exp(float(log_decay[h])) if log_decay is not None else 1.0
        M = torch.where(diff >= 0, lam ** diff.clamp_min(0), torch.zeros((), dtype=torch.float64))
        s = q[:, h].double() @ k[:, h].double().transpose(-1, -2)
        out[:, h] = (s * M) @ v[:, h].double()
    return out


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("T,chunk,e,block_v", [(40, 16, 32, 16), (16, 16, 16, 64), (7, 32, 16, 16)])
def test_kernel_equals_the_explicit_decayed_product(decay, T, chunk, e, block_v):
    g = torch.Generator().manual_seed(T + e)
    B, H, d = 2, 3, 16
    q, k = (torch.randn(B, H, T, d, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, e, generator=g)
    ld = -torch.tensor([0.05, 0.3, 1.0]) if decay else None
    got = kern.lightning_causal(q, k, v, ld, chunk=chunk, block_v=block_v)
    want = explicit(q, k, v, ld)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_kernel_refuses_bad_shapes_and_decays():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="power-of-two"):
        kern.lightning_causal(torch.randn(1, 2, 8, 12), torch.randn(1, 2, 8, 12), q)
    with pytest.raises(ValueError, match="one shape"):
        kern.lightning_causal(q, torch.randn(1, 1, 8, 16), q)
    with pytest.raises(ValueError, match="log_decay"):
        kern.lightning_causal(q, q, q, torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="chunk"):
        kern.lightning_causal(q, q, q, chunk=8)


@pytest.mark.parametrize("decay", [False, True])
def test_lightning_impl_triton_equals_the_reference(decay):
    """Lightning(impl=triton) takes the kernel for a causal forward prefill (and the PyTorch
    tiling with a gradient, or a cache longer than the queries): each equal to impl=reference."""
    import methods
    from tests.conftest import seeded_qkv

    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=40, D=16, dtype=torch.float32)
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, decay=decay, block_size=16)
    tri, ref = methods.load("lightning", impl="triton", **kw), methods.load("lightning", impl="reference", **kw)
    with torch.no_grad():
        torch.testing.assert_close(tri(q, k, v, causal=True), ref(q, k, v, causal=True), rtol=1e-4, atol=1e-4)
        qs = q[:, :, -5:]  # Tq < Tk: the PyTorch tiling
        torch.testing.assert_close(tri(qs, k, v, causal=True), ref(qs, k, v, causal=True), rtol=1e-4, atol=1e-4)
    qg = q.clone().requires_grad_()
    out = tri(qg, k, v, causal=True)  # with a gradient: the PyTorch tiling, differentiable
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    calls = []
    orig = kern.lightning_causal
    try:
        kern.lightning_causal = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
        with torch.no_grad():
            tri(q, k, v, causal=True)
    finally:
        kern.lightning_causal = orig
    assert calls, "impl=triton did not take the kernel for a causal forward prefill"
