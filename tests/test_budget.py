"""Equal-budget runs (methods/budget.py): the fitted knob is the one, among all its values, whose
density on the inputs is nearest the target (checked here by building the method at every value
through its constructor), the record carries target and achieved density, the leaderboard shows
quality per target."""
from __future__ import annotations

import math

import pytest
import torch

import methods
from methods import budget
from tests.conftest import seeded_qkv

T = 64
H, HKV, D = 2, 1, 8
CASES = {  # name, hyperparameters (small), the knob's values to try by brute force
    "sliding_window": (dict(), range(1, T + 1)),
    "bigbird": (dict(block_size=8, num_global_blocks=1, num_random_blocks=1), range(1, 2 * (T // 8) + 2)),
    "hip": (dict(block_q=8, block_k=2, window=2), range(2, T + 1)),
    "nsa": (dict(block_size=8, window=8, compress_block=8, compress_stride=4), range(1, T // 8 + 1)),
    "minference": (dict(pattern="vertical_slash", vertical_size=4, forced_sink=1, forced_local=1, last_q=8,
                        slash_mode="lines"), range(0, T + 1)),
    "minference_bs": (dict(pattern="block_sparse", block_size=8), range(1, T // 8 + 1)),
    "minference_a": (dict(pattern="a_shape", num_sink=4), range(1, T + 1)),
    "sea": (dict(block_size=8, num_features=16), range(1, T // 8 + 1)),
    "streaming_llm": (dict(num_sink=2), range(1, T + 1)),
}
KNOB = {"sliding_window": "window", "bigbird": "num_window_blocks", "hip": "top_k", "nsa": "num_selected",
        "minference": "slash_size", "minference_bs": "top_k_blocks", "minference_a": "window",
        "sea": "top_k_blocks", "streaming_llm": "window"}


def build(case, **kw):
    name = case.split("_bs")[0].split("_a")[0] if case.startswith("minference") else case
    return methods.load(name, num_heads=H, num_kv_heads=HKV, head_dim=D, impl="reference", **CASES[case][0], **kw)


def qkv():
    return seeded_qkv(B=1, H=H, Hkv=HKV, T=T, D=D, dtype=torch.float32, seed=3)


def density_by_construction(case, value, q, k, v):
    m = build(case, **{KNOB[case]: value})
    with torch.no_grad():
        m(q, k, v, causal=True)
    return float(m.last_density)


@pytest.mark.parametrize("target", [0.1, 0.3])
@pytest.mark.parametrize("case", list(CASES))
def test_integer_knob_is_the_nearest_of_all_values(case, target):
    q, k, v = qkv()
    fit = budget.fit_density(build(case), q, k, v, True, target)
    assert fit.knob == KNOB[case]
    every = {x: density_by_construction(case, x, q, k, v) for x in CASES[case][1]}
    best = min(abs(d - target) for d in every.values())
    assert abs(fit.density - target) == pytest.approx(best, abs=1e-12)
    assert fit.density == pytest.approx(every[fit.value])  # the copy at the budget = the method built so
    assert fit.calls <= math.ceil(math.log2(len(every))) + 3  # a search, not a sweep


def test_sliding_window_fit_against_closed_form():
    """The window whose density sum_i min(i + 1, w) / (T (T + 1) / 2) is nearest the target."""
    q, k, v = qkv()
    pairs = T * (T + 1) / 2
    for target in (0.05, 0.2, 0.5):
        dens = {w: sum(min(i + 1, w) for i in range(T)) / pairs for w in range(1, T + 1)}
        want = min(dens, key=lambda w: (abs(dens[w] - target), w))
        fit = budget.fit_density(build("sliding_window"), q, k, v, True, target)
        assert fit.value == want and fit.density == pytest.approx(dens[want])


def test_sample_attention_alpha_bisection_is_at_least_as_near_as_a_grid():
    q, k, v = qkv()
    kw = dict(row_ratio=0.25, window_ratio=0.05)
    m = methods.load("sample_attention", num_heads=H, num_kv_heads=HKV, head_dim=D, impl="reference", **kw)
    for target in (0.2, 0.4):
        fit = budget.fit_density(m, q, k, v, True, target)
        grid = []
        for a in torch.linspace(0.01, 1.0, 100).tolist():
            g = methods.load("sample_attention", num_heads=H, num_kv_heads=HKV, head_dim=D, impl="reference",
                             alpha=a, **kw)
            with torch.no_grad():
                g(q, k, v, causal=True)
            grid.append(abs(g.last_density - target))
        assert abs(fit.density - target) <= min(grid) + 1e-12
        assert fit.knob == "alpha" and 0 < fit.value <= 1


def test_bad_requests_are_refused():
    q, k, v = qkv()
    for bad in (0, 1.5, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="target density"):
            budget.fit_density(build("sliding_window"), q, k, v, True, bad)
    with pytest.raises(ValueError, match="no budget knob"):
        budget.fit_density(methods.load("dense", num_heads=H, head_dim=D), q, k, v, True, 0.1)


def test_kernel_runner_records_target_and_achieved_density(compose_cfg, store):
    from analysis.records import load
    from analysis.render import render
    from analysis.tables import budget_table
    from runners import run

    for target in (0.1, 0.2):
        (rec,) = run(compose_cfg("method=sliding_window", "method.impl=reference", "runner.seq_lens=[64]",
                                 "runner.causal=true", f"+runner.target_density={target}"))
        assert rec.status == "ok", rec.error
        assert rec.metrics["target_density"] == target
        w = rec.details["budget"]["value"]
        assert rec.details["budget"]["knob"] == "window"
        assert rec.metrics["density_achieved"] == pytest.approx(sum(min(i + 1, w) for i in range(64)) / (64 * 65 / 2))
        assert abs(rec.metrics["density_achieved"] - target) < 0.02
    (rec,) = run(compose_cfg("method=dense", "runner.seq_lens=[64]", "runner.causal=true",
                             "+runner.target_density=0.1"))
    assert rec.status == "ok" and rec.details["budget"].startswith("no budget knob")
    assert rec.metrics["density_achieved"] == pytest.approx(1.0)
    t = budget_table(load(store)).set_index("method")
    assert {"rel err @10%", "rel err @20%", "density @10%", "density @20%"} <= set(t.columns)
    assert float(t.loc["sliding_window", "density @10%"]) < float(t.loc["sliding_window", "density @20%"])
    assert t.loc["dense", "density @20%"] == "-"  # dense ran at 10% only
    assert "Equal budget" in render(load(store))


def test_flex_density_counts_a_shared_mask_for_every_head():
    """A FlexAttention block mask built once for all batch rows and heads (leading sizes 1) is
    visited by each of them: the density is the work of one head over the pairs of one head, so
    it is the same at B=2, H=3 as at B=1, H=1 (before the fix it was B * H times too small, and an
    equal-budget fit of the sliding window at H=32 ran the whole sequence while reporting 3%)."""
    Tl, blk = 512, 128
    for w, want in ((1, (Tl // blk) * blk * blk / (Tl * (Tl + 1) / 2)), (Tl, 1.0)):
        got = []
        for b, h in ((1, 1), (2, 3)):
            m = methods.load("sliding_window", num_heads=h, num_kv_heads=h, head_dim=D, impl="flex", window=w)
            assert m.flex_block_size == blk
            q, k, v = (torch.randn(b, h, Tl, D) for _ in range(3))
            with torch.no_grad():
                m(q, k, v, causal=True)
            assert m.last_path == "flex"
            got.append(m.last_density)
        assert got == pytest.approx([want, want]), (w, got)
