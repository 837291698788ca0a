"""methods/kernels/lightning.py (Lightning Attention's causal tiled product in Triton, run under
TRITON_INTERPRET=1 here) against the explicit decayed matrix written in the test:
O = (Q K^T (.) M) V, M_ij = lambda^(i-j) for j <= i, else 0; its backward kernels against
torch.autograd through that explicit form."""
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


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("T,chunk,e,block_v", [(40, 16, 32, 16), (16, 16, 16, 64), (7, 32, 16, 16)])
def test_kernel_equals_the_explicit_decayed_product(decay, T, chunk, e, block_v, two_pass):
    g = torch.Generator().manual_seed(T + e)
    B, H, d = 2, 3, 16
    q, k = (torch.randn(B, H, T, d, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, e, generator=g)
    ld = -torch.tensor([0.05, 0.3, 1.0]) if decay else None
    got = kern.lightning_causal(q, k, v, ld, chunk=chunk, block_v=block_v, two_pass=two_pass)
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
    with pytest.raises(ValueError, match="block_v"):
        kern.lightning_causal(q, q, q, block_v=24)


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("T,chunk,d,e,block_v", [(40, 16, 16, 32, 16), (7, 32, 32, 16, 16), (48, 16, 16, 16, 64),
                                                 (20, 16, 128, 32, 16)])
def test_kernel_gradients_equal_autograd_of_the_explicit_product(decay, T, chunk, d, e, block_v, two_pass):
    """dQ, dK, dV of the kernel path (Alg. 2's backward) against autograd through the explicit
    decayed matrix in fp64: lengths that are and are not a multiple of the chunk, one chunk
    longer than the sequence, d != e, value blocks narrower than e, d = 128 (two blocks of state
    rows in the two-pass states); one pass and two."""
    g = torch.Generator().manual_seed(3 * T + d)
    B, H = 2, 3
    q, k = (torch.randn(B, H, T, d, generator=g) for _ in range(2))
    v, do = (torch.randn(B, H, T, e, generator=g) for _ in range(2))
    ld = -torch.tensor([0.05, 0.3, 1.0]) if decay else None
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = kern.lightning_causal(*leaves, ld, chunk=chunk, block_v=block_v, two_pass=two_pass)
    got = torch.autograd.grad(out, leaves, do)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(explicit(*ref, ld), ref, do.double())
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("two_pass", [False, True])
def test_kernel_gradients_in_fp16(two_pass):
    """fp16 operands (the products take fp16, accumulate in fp32): gradients in fp16, within
    fp16 rounding of the explicit form's on the same fp16-rounded inputs."""
    g = torch.Generator().manual_seed(11)
    q, k, v, do = (torch.randn(1, 2, 40, 16, generator=g).half() for _ in range(4))
    ld = -torch.tensor([0.1, 0.5])
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = torch.autograd.grad(kern.lightning_causal(*leaves, ld, chunk=16, two_pass=two_pass), leaves, do)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(explicit(*ref, ld), ref, do.double())
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float16, name
        err = float((a.double() - b).norm() / b.norm())
        assert err < 3e-3, f"d{name}: relative error {err:.1e}"


def test_kernel_gradient_only_where_asked():
    """A gradient asked for v alone (q and k constants): dv is the explicit form's."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    vg = v.clone().requires_grad_()
    out = kern.lightning_causal(q, k, vg, chunk=16)
    assert out.requires_grad and not q.requires_grad
    (dv,) = torch.autograd.grad(out, vg, torch.ones_like(out))
    vr = v.double().requires_grad_()
    (want,) = torch.autograd.grad(explicit(q, k, vr, None), vr, torch.ones(1, 2, 20, 16, dtype=torch.float64))
    torch.testing.assert_close(dv.double(), want, rtol=1e-4, atol=1e-4)


def _norm_attention_written_out(q, k, v, decay):
    """Lightning's default (silu features, GQA by repeating KV heads, norm over all heads, decay
    lambda_h = exp(-2^(-8 (h+1) / H) (1 + 1e-5)) for one layer), written out in fp64."""
    H, rep = q.shape[1], q.shape[1] // k.shape[1]
    fq = torch.nn.functional.silu(q.double())
    fk = torch.nn.functional.silu(k.double()).repeat_interleave(rep, 1)
    vv = v.double().repeat_interleave(rep, 1)
    ld = -torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64) * (1 + 1e-5)
    o = explicit(fq, fk, vv, ld if decay else None)
    return o * torch.rsqrt((o * o).mean((1, 3), keepdim=True) + 1e-6)


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("decay", [False, True])
def test_lightning_impl_triton_trains_through_the_kernel(decay, two_pass):
    """Lightning(impl=triton) with a gradient takes the kernel (forward and backward), GQA and a
    length not a multiple of the block: output and dq, dk, dv equal autograd through NormAttention
    written out in the test."""
    import methods
    from tests.conftest import seeded_qkv

    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=37, D=16, dtype=torch.float32)
    m = methods.load("lightning", impl="triton", num_heads=4, num_kv_heads=2, head_dim=16, decay=decay,
                     block_size=16, two_pass=two_pass)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    fn = kern._LightningCausal2 if two_pass else kern._LightningCausal
    calls, orig = [], fn.backward
    try:
        fn.backward = staticmethod(lambda ctx, do: calls.append(1) or orig(ctx, do))
        out = m(*leaves, causal=True)
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad(out, leaves, do)
    finally:
        fn.backward = staticmethod(orig)
    assert calls, "impl=triton did not take the backward kernel"
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    want_out = _norm_attention_written_out(*ref, decay)
    want = torch.autograd.grad(want_out, ref, do.double())
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda msg, n=name: f"d{n}: {msg}")


@pytest.mark.parametrize("decay", [False, True])
def test_lightning_impl_triton_equals_the_reference(decay):
    """Lightning(impl=triton) takes the kernel for causal self-attention (and the PyTorch tiling
    for a cache longer than the queries, with or without a gradient): each equal to impl=reference."""
    import methods
    from tests.conftest import seeded_qkv

    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=40, D=16, dtype=torch.float32)
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, decay=decay, block_size=16)
    tri, ref = methods.load("lightning", impl="triton", **kw), methods.load("lightning", impl="reference", **kw)
    with torch.no_grad():
        torch.testing.assert_close(tri(q, k, v, causal=True), ref(q, k, v, causal=True), rtol=1e-4, atol=1e-4)
        qs = q[:, :, -5:]  # Tq < Tk: the PyTorch tiling
        torch.testing.assert_close(tri(qs, k, v, causal=True), ref(qs, k, v, causal=True), rtol=1e-4, atol=1e-4)
    qg = q[:, :, -5:].clone().requires_grad_()
    qr = qg.detach().clone().requires_grad_()
    (gt,) = torch.autograd.grad(tri(qg, k, v, causal=True).sum(), qg)  # Tq < Tk: the tiling's autograd
    (gr,) = torch.autograd.grad(ref(qr, k, v, causal=True).sum(), qr)
    torch.testing.assert_close(gt, gr, rtol=1e-4, atol=1e-4)
    calls = []
    orig = kern.lightning_causal
    try:
        kern.lightning_causal = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
        with torch.no_grad():
            tri(q, k, v, causal=True)
    finally:
        kern.lightning_causal = orig
    assert calls, "impl=triton did not take the kernel for a causal forward prefill"


def test_lightning_two_pass_must_be_a_bool():
    import methods

    with pytest.raises(ValueError, match="two_pass"):
        methods.load("lightning", impl="triton", num_heads=2, num_kv_heads=2, head_dim=16, two_pass="yes")
