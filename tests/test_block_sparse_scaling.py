"""scripts/block_sparse_scaling.py (issue 28, target 1's density scaling and backward) on the
CPU: the Triton interpreter at a toy size, no timings; the full-density kernel equals SDPA
(outputs and gradients) and the sparse layouts keep the diagonal and about the density asked."""
import torch

from scripts import block_sparse_scaling as s


def test_full_density_equals_sdpa_and_sparse_layouts_keep_the_diagonal():
    cpu = torch.device("cpu")
    full = s.measure(256, 16, 2, 1.0, torch.float32, cpu, backward=True)
    assert full["density"] == 1.0 and full["rel_err_vs_exact"] < 1e-5 and full["grad_rel_err_vs_sdpa"] < 1e-5
    layout = s.causal_layout(32, 32, 64, 64, 0.1, 4, 0, cpu)
    assert bool(layout[:, torch.arange(32), torch.arange(32)].all())  # every query tile keeps its diagonal
    assert not bool(torch.triu(layout, 1).any())  # nothing past it
    kept = float(layout.sum()) / (4 * 32 * 33 / 2)
    assert 0.07 < kept < 0.13, kept
    pairs = s.kept_pairs(layout[:1], 32 * 64, 64, 64)  # the diagonal tiles hold 64 * 65 / 2 pairs each
    assert pairs >= 32 * 64 * 65 / 2
    rows = [dict(D=16, T=256, density_asked=1.0, density=1.0, fwd_ms=2.0, sdpa_fwd_ms=1.0, tflops=1.0),
            dict(D=16, T=256, density_asked=0.1, density=0.1, fwd_ms=0.26, sdpa_fwd_ms=1.0, tflops=1.0)]
    assert "| 16 | 256 | 0.100 | 0.260 | 1 | 3.85 | 1.30 |" in s.table(rows)
