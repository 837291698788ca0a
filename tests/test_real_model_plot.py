"""The quality-against-prefill plot of the real-model table: which points it places and which it
calls the Pareto front, on hand-written records."""
import json

import pytest

from analysis import plots
from analysis.leaderboard import main as leaderboard


def _rec(method, task, impl="flex", ms=None, **metrics):
    return {"run_id": f"{method}-{impl}-{task}", "time": "2026-01-01T00:00:00", "method": method,
            "impl": impl, "real_kernel": True, "model": "smollm2_135m", "task": task,
            "runner": "pretrained", "seq_len": 8192, "batch_size": 1, "dtype": "bfloat16",
            "device": "cuda", "causal": True, "status": "ok", "error": None, "seed": 0,
            "method_params": {}, "env": {}, "details": {}, "metrics": metrics,
            "latency_ms": {} if ms is None else {"prefill": {"p20": ms, "p50": ms, "p80": ms}},
            "peak_mem_bytes": {}, "cost": None}


def _store(tmp_path):
    recs = [_rec("dense", "perplexity", "sdpa", ms=40, perplexity=24.0),
            _rec("dense", "needle", "sdpa", **{"needle@4096": 0.9, "needle@8000": 0.7}),
            _rec("sliding_window", "perplexity", ms=30, perplexity=40.0),   # faster, worse: front
            _rec("sliding_window", "needle", **{"needle@4096": 0.3, "needle@8000": 0.3}),
            _rec("bigbird", "perplexity", ms=70, perplexity=30.0),          # slower and worse
            _rec("bigbird", "needle", **{"needle@4096": 0.5, "needle@8000": 0.3}),
            _rec("sparsek", "perplexity", ms=None, perplexity=50.0)]        # no timed prefill
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_real_model_plot_places_timed_methods_and_marks_the_front(tmp_path, monkeypatch):
    drawn = []
    real_scatter = plots.plt.Axes.scatter

    def spy(ax, x, y, **kw):
        drawn.append((kw["label"], float(x), float(y), kw["marker"]))
        return real_scatter(ax, x, y, **kw)

    monkeypatch.setattr(plots.plt.Axes, "scatter", spy)
    out = tmp_path / "p.png"
    assert leaderboard(["--store", str(_store(tmp_path)), "--real-pareto", str(out)]) == 0
    assert out.stat().st_size > 0
    ppl = {lab: (x, y, m) for lab, x, y, m in drawn if y > 1}
    needle = {lab: (x, y, m) for lab, x, y, m in drawn if y <= 1}
    assert set(ppl) == {"dense (sdpa)", "sliding_window (flex)", "bigbird (flex)"}  # sparsek: untimed
    assert ppl["dense (sdpa)"] == (40.0, 24.0, "*") and ppl["sliding_window (flex)"][2] == "*"
    assert ppl["bigbird (flex)"][2] == "o"
    assert needle["dense (sdpa)"] == (40.0, pytest.approx(0.8), "*")
    assert needle["bigbird (flex)"][2] == "o" and needle["sliding_window (flex)"][2] == "*"


def test_real_model_plot_refuses_records_without_a_pretrained_run(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({**_rec("dense", "perplexity", ms=1, perplexity=2.0), "runner": "kernel"}) + "\n")
    with pytest.raises(ValueError, match="runner=pretrained"):
        plots.real_model_pareto(plots.pd.read_json(path, lines=True), tmp_path / "x.png")
