"""MInference's call does the attention and no density count (issue 28).

runner=kernel times ``method(q, k, v)``. The effective density (``effective_pairs``) is host
work (A-shape: a [T] range per head; block-sparse: an [nq, nk] table copied to the device and a
sync), which made the timed A-shape call 10x slower at 128k tokens on an H200 (4.7 -> 46.8 ms)
and block-sparse 8x (13 -> 104 ms). It is counted when ``last_density`` is read.
"""
from __future__ import annotations

import pytest
import torch

from methods.kernels import block_sparse as bsk
from methods.minference import MInference
from tests.conftest import seeded_qkv

T, H, D, SINK, WINDOW, BS, TOPK = 256, 2, 16, 16, 80, 64, 2


def _counting(monkeypatch):
    calls = []
    real = MInference.effective_pairs

    def counted(self, *a, **kw):
        calls.append(a)
        return real(self, *a, **kw)

    monkeypatch.setattr(MInference, "effective_pairs", counted)
    return calls


def _causal_pairs(t):
    return t * (t + 1) // 2


@pytest.mark.parametrize("pattern", ["a_shape", "block_sparse"])
def test_the_call_counts_no_density_and_the_read_does(pattern, monkeypatch):
    if not bsk.usable(torch.zeros(1)):
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    calls = _counting(monkeypatch)
    m = MInference(pattern=pattern, impl="triton", num_heads=H, head_dim=D, num_sink=SINK, window=WINDOW,
                   block_size=BS, top_k_blocks=TOPK)
    q, k, v = seeded_qkv(B=1, H=H, Hkv=H, T=T, D=D, dtype=torch.float32)
    with torch.no_grad():
        m(q, k, v, causal=True)
    assert m.last_path == "triton"
    assert calls == [], "the timed call counted the effective density"

    qi = torch.arange(T).view(T, 1)
    ki = torch.arange(T).view(1, T)
    causal = ki <= qi
    if pattern == "a_shape":  # sinks and the local window, every head alike
        kept = H * int((causal & ((ki < SINK) | (qi - ki < WINDOW))).sum())
    else:  # the causal pairs of the key blocks each query block listed (the kernel's lists)
        _, index = m._index["block_sparse"]
        idx, cnt = index["idx"], index["cnt"]
        kept = 0
        for h in range(H):
            for qb in range(T // BS):
                tiles = {int(x) for x in idx[0, h, qb, :int(cnt[0, h, qb])]}
                rows = (qi // BS == qb) & causal
                kept += int((rows & torch.isin(ki // BS, torch.tensor(sorted(tiles), dtype=torch.long))).sum())
        assert kept > 0
    want = kept / (H * _causal_pairs(T))
    assert m.last_density == pytest.approx(want, rel=1e-12)
    assert len(calls) == 1
    assert m.last_density == pytest.approx(want, rel=1e-12)
    assert len(calls) == 1, "the density is counted once per call"

    # a decode step sets its density (dense) without a count
    with torch.no_grad():
        m(q[:, :, -1:], k, v, causal=True)
    assert m.last_density == 1.0 and len(calls) == 1
