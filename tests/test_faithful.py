"""Fidelity to the official code and papers (issue 21): each method against a computation
written here from the official code's or the paper's definition, not from the method's helpers."""
import math

import pytest
import torch

import methods
from tests.conftest import seeded_qkv

F64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- Nystromformer: mlpen/Nystromformer, NystromAttention.iterative_inv ---------------------
def nystrom_direct(q, k, v, m, iters, init):
    """The official forward without the conv skip (T divisible by m): landmarks are segment
    means; Z_0 = K^T / max(column sums) over the whole tensor ('original') or per matrix."""
    B, H, T, D = q.shape
    ql = q.reshape(B, H, m, T // m, D).mean(-2)
    kl = k.reshape(B, H, m, T // m, D).mean(-2)
    s = 1 / math.sqrt(D)
    k1 = torch.softmax(q @ kl.transpose(-1, -2) * s, -1)
    k2 = torch.softmax(ql @ kl.transpose(-1, -2) * s, -1)
    k3 = torch.softmax(ql @ k.transpose(-1, -2) * s, -1)
    eye = torch.eye(m, dtype=q.dtype)
    if init == "original":
        z = 1 / torch.max(torch.sum(k2, dim=-2)) * k2.transpose(-1, -2)
    else:
        z = 1 / torch.max(torch.sum(k2, dim=-2), dim=-1).values[:, :, None, None] * k2.transpose(-1, -2)
    for _ in range(iters):
        kz = k2 @ z
        z = (0.25 * z) @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
    return k1 @ z @ (k3 @ v)


@pytest.mark.parametrize("init", ["original", "exact"])
def test_nystrom_both_inits_equal_the_official_iteration(init):
    q, k, v = seeded_qkv(B=3, H=2, Hkv=2, T=64, D=16)
    q = q * torch.tensor([0.5, 1.0, 3.0], dtype=F64).view(3, 1, 1, 1)  # batch elements differ in scale
    m = methods.load("nystrom", num_heads=2, head_dim=16, num_landmarks=8, conv_kernel=0,
                     pinv_init=init).double()
    torch.testing.assert_close(m(q, k, v), nystrom_direct(q, k, v, 8, 6, init), rtol=1e-10, atol=1e-12)


def test_nystrom_original_init_is_the_default_and_depends_on_the_batch():
    assert methods.load("nystrom").pinv_init == "original"
    q, k, v = seeded_qkv(B=2, H=2, Hkv=2, T=64, D=16)
    q = q * torch.tensor([0.3, 4.0], dtype=F64).view(2, 1, 1, 1)
    orig, ex = (methods.load("nystrom", num_heads=2, head_dim=16, num_landmarks=8, conv_kernel=0,
                             pinv_init=i).double() for i in ("original", "exact"))
    alone = orig(q[:1], k[:1], v[:1])
    assert not torch.allclose(orig(q, k, v)[:1], alone, rtol=1e-6, atol=0)  # the batch shares a scale
    torch.testing.assert_close(ex(q, k, v)[:1], ex(q[:1], k[:1], v[:1]))  # per matrix: it does not
    with pytest.raises(ValueError, match="pinv_init"):
        methods.load("nystrom", pinv_init="per_row")
