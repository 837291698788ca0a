"""Index timing is opt-in (``methods.base.index_timing``): off (the default) a method's call
takes no synced clock and leaves ``last_index_ms`` None; on, it records the index step's time.
runner=kernel records ``index_ms`` and ``attention_ms`` for a method that has an index step,
and the leaderboard shows the index ms beside the forward latency."""
from __future__ import annotations

import pytest
import torch

import methods
import methods.base as base
from methods.base import index_timing
from tests.conftest import seeded_qkv

# every method with an index step, at a size where it builds one (small budgets, T = 48)
INDEXED = {
    "hip": dict(top_k=4, block_q=8, block_k=2, window=2),
    "sample_attention": dict(alpha=0.5, row_ratio=0.1, window_ratio=0.1),
    "sparge": dict(block_q=8, block_k=8),
    "minference": dict(pattern="vertical_slash", vertical_size=4, slash_size=2, forced_sink=1, forced_local=1,
                       last_q=8),
    "nsa": dict(block_size=8, num_selected=2, window=8, compress_block=8, compress_stride=4),
    "sparsek": dict(k=8, window=4),
    "hyper_attention": dict(block_size=8, sample_size=4, min_seq_len=8),
    "sea": dict(block_size=8, top_k_blocks=2, num_features=8),
    "biformer": dict(region_size=8, topk=2),
    "seer_attention": dict(block_size=8, hidden_size=8, selection="topk", nz_ratio=0.3),
}
NONCAUSAL = ("biformer",)


def build(name):
    extra = {"gate": "untrained"} if name == "seer_attention" else {}
    return methods.load(name, num_heads=4, num_kv_heads=2, head_dim=8, impl="reference", **INDEXED[name], **extra)


@pytest.fixture
def clock_calls(monkeypatch):
    """The synced clock counted (it is the only place a method syncs for its index time)."""
    calls = []
    real = base.synced_clock

    def counted(x):
        calls.append(x.device)
        return real(x)

    monkeypatch.setattr(base, "synced_clock", counted)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("cuda.synchronize"))
    return calls


def test_every_method_with_an_index_says_so():
    for name in INDEXED:
        assert build(name).has_index, name
    assert not methods.load("dense", num_heads=4, head_dim=8).has_index


@pytest.mark.parametrize("name", list(INDEXED))
def test_index_timing_is_off_by_default_and_on_when_asked(name, clock_calls):
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=48, D=8, dtype=torch.float32)
    m = build(name)
    causal = name not in NONCAUSAL
    with torch.no_grad():
        m(q, k, v, causal=causal)
    assert clock_calls == [] and m.last_index_ms is None  # off: no sync, no value
    with torch.no_grad(), index_timing(True):
        m(q, k, v, causal=causal)
    assert len(clock_calls) >= 2 and "cuda.synchronize" not in clock_calls  # CPU inputs: no CUDA sync
    assert m.last_index_ms is not None and m.last_index_ms >= 0
    n = len(clock_calls)
    with torch.no_grad():  # off again: the value of the timed call does not linger
        m(q, k, v, causal=causal)
    assert len(clock_calls) == n and m.last_index_ms is None


def test_several_index_steps_of_one_call_add_up(monkeypatch):
    """A call with two index steps (a searched MInference mix: vertical-slash and block-sparse
    heads) records their sum: each step's time is taken from a fake clock here."""
    ticks = iter([0.0, 0.002, 0.010, 0.013])  # step one: 2 ms, step two: 3 ms
    monkeypatch.setattr(base, "synced_clock", lambda x: next(ticks))
    m = build("hip")
    q, k, _ = seeded_qkv(B=1, H=4, Hkv=2, T=48, D=8, dtype=torch.float32)
    m.last_index_ms = None
    with index_timing(True):
        m.block_layout(q, k, True)
        m.block_layout(q, k, True)
    assert m.last_index_ms == pytest.approx(5.0)


def test_kernel_runner_records_index_and_attention_time(compose_cfg):
    from runners import run

    recs = run(compose_cfg("method=hip", "method.top_k=8", "method.block_q=8", "method.block_k=2",
                           "method.window=4", "method.impl=reference", "runner.seq_lens=[64]",
                           "runner.causal=true"))
    (rec,) = recs
    assert rec.status == "ok", rec.error
    idx = rec.metrics["index_ms"]
    assert idx > 0
    assert rec.metrics["attention_ms"] == pytest.approx(rec.latency_ms["forward"]["p50"] - idx)
    dense = run(compose_cfg("method=dense", "runner.seq_lens=[64]", "runner.causal=true"))[0]
    assert "index_ms" not in dense.metrics and "attention_ms" not in dense.metrics


def test_leaderboard_shows_index_ms_beside_latency(compose_cfg, store):
    from analysis.records import load
    from analysis.tables import kernel_table
    from runners import run

    run(compose_cfg("method=sparge", "method.block_q=16", "method.block_k=16", "method.impl=reference",
                    "runner.seq_lens=[64]", "runner.causal=true"))
    run(compose_cfg("method=dense", "runner.seq_lens=[64]", "runner.causal=true"))
    t = kernel_table(load(store)).set_index("method")
    cols = list(t.columns)
    assert cols.index("index ms @64") == cols.index("fwd ms @64") + 1
    assert float(t.loc["sparge", "index ms @64"]) > 0
    assert t.loc["dense", "index ms @64"] == "-"
