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
