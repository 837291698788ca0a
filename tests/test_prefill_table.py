"""The prefill table's pieces (issue 25): recall by sampled rows without the [T, T] map
(``tasks.recall.sampled_recall``), runner=kernel's recall at every length, runner=pretrained's
index time, the table and figure (``analysis.prefill``) and prefill_family_check's refusals."""
from __future__ import annotations

import math

import pytest
import torch

import methods
from tasks.recall import sampled_recall
from tests.conftest import seeded_qkv

# methods choosing keys through mask_mod (row by row) and one through computed_keys (HyperAttention)
CASES = {
    "star_attention": dict(num_hosts=3, query_len=8),
    "sample_attention": dict(alpha=0.5, row_ratio=0.1, window_ratio=0.1),
    "hip": dict(top_k=8, block_q=8, block_k=2, window=4),
    "hyper_attention": dict(min_seq_len=16, block_size=16, sample_size=8),
}


def build(name, **kw):
    return methods.build(methods.compose_method(name), num_heads=4, num_kv_heads=2, head_dim=16, max_seq_len=256,
                         impl="reference", **{**CASES.get(name, {}), **kw})


def explicit(q, k, computed, rows):
    """Recall and density over ``rows``, written out: scores, causal -inf, softmax, mass on the
    computed keys, per (batch, head, row), averaged."""
    B, H, T, D = q.shape
    kk = k.repeat_interleave(H // k.shape[1], 1).double()
    rec, den = [], []
    for b in range(B):
        for h in range(H):
            for i in rows:
                s = (q[b, h, i].double() @ kk[b, h, : i + 1].T) / math.sqrt(D)
                p = torch.softmax(s, -1)
                c = computed[b, h, i, : i + 1]
                rec.append(float(p[c].sum()))
                den.append(float(c.sum()) / (i + 1))
    return sum(rec) / len(rec), sum(den) / len(den)


@pytest.mark.parametrize("name", list(CASES))
def test_sampled_recall_matches_an_explicit_computation(name):
    q, k, _ = seeded_qkv(B=1, T=96, dtype=torch.float32, seed=3)
    m = build(name)
    computed = m.computed_keys(q, k, True).expand(1, 4, 96, 96)
    got_all = sampled_recall(m, q, k, True, rows=1000, chunk=7)  # every row, odd chunks
    want = explicit(q, k, computed, range(96))
    assert got_all["rows"] == 96
    assert got_all["recall"] == pytest.approx(want[0], abs=1e-5)
    assert got_all["density"] == pytest.approx(want[1], abs=1e-6)
    got = sampled_recall(m, q, k, True, rows=10, chunk=4)
    rows = [round(i * 95 / 9) for i in range(10)]  # spread evenly, first and last included
    want = explicit(q, k, computed, rows)
    assert got["rows"] == 10
    assert got["recall"] == pytest.approx(want[0], abs=1e-5)
    assert got["density"] == pytest.approx(want[1], abs=1e-6)


def test_sampled_recall_is_none_for_methods_choosing_no_keys():
    q, k, _ = seeded_qkv(B=1, T=64, dtype=torch.float32)
    assert sampled_recall(build("performer"), q, k, True) is None


def test_kernel_runner_records_recall_at_each_length(compose_cfg):
    from runners import run

    recs = run(compose_cfg("method=star_attention", "method.num_hosts=3", "method.query_len=8",
                           "method.impl=reference", "runner.seq_lens=[48,96]", "runner.causal=true",
                           "+runner.recall_rows=16"))
    assert [r.status for r in recs] == ["ok", "ok"], [r.error for r in recs]
    for r in recs:
        assert 0 < r.metrics["recall"] <= 1 + 1e-6 and 0 < r.metrics["recall_density"] < 1
        assert "structured inputs" in r.details["recall"] and "16 query rows" in r.details["recall"]
    plain = run(compose_cfg("method=star_attention", "method.impl=reference", "runner.seq_lens=[48]",
                            "runner.causal=true"))[0]
    assert "recall" not in plain.metrics  # off unless asked


class _Layer(torch.nn.Module):
    def __init__(self, method):
        super().__init__()
        self._attnbench_method = method


def test_pretrained_runner_sums_the_index_time_of_its_layers():
    from runners.pretrained import PretrainedRunner

    q, k, v = seeded_qkv(B=1, T=64, dtype=torch.float32)
    layers = [build("sample_attention"), build("sample_attention"), build("dense")]
    model = torch.nn.Sequential(*(_Layer(m) for m in layers))

    def fwd():
        for m in layers:
            m(q, k, v, causal=True)

    got = PretrainedRunner._index_time(model, fwd)
    assert got["index_layers"] == 2
    assert got["index_ms"] == pytest.approx(layers[0].last_index_ms + layers[1].last_index_ms)
    assert got["index_ms"] > 0
    dense_only = torch.nn.Sequential(_Layer(build("dense")))
    assert PretrainedRunner._index_time(dense_only, lambda: None) == {}


def test_prefill_report_table_and_figure(compose_cfg, store, tmp_path):
    from analysis import prefill
    from analysis.records import load
    from runners import run

    run(compose_cfg("method=dense", "runner.seq_lens=[48,96]", "runner.causal=true"))
    run(compose_cfg("method=star_attention", "method.num_hosts=3", "method.query_len=8", "method.impl=reference",
                    "runner.seq_lens=[48,96]", "runner.causal=true", "+runner.recall_rows=16"))
    run(compose_cfg("method=hyper_attention", "method.min_seq_len=16", "method.block_size=16",
                    "method.sample_size=8", "runner.seq_lens=[48]", "runner.causal=true"))
    written = prefill.report(store, str(tmp_path / "none.jsonl"), tmp_path / "out")
    assert [p.name for p in written] == ["table.md", "recall_vs_time.png"]
    assert (tmp_path / "out" / "recall_vs_time.png").stat().st_size > 0
    df = load(store)
    rows = prefill.kernel_rows(df)
    for n in (48, 96):
        d = df[(df["method"] == "dense") & (df["seq_len"] == n)].iloc[-1]
        s = df[(df["method"] == "star_attention") & (df["seq_len"] == n)].iloc[-1]
        r = rows[(rows["label"] == "star_attention") & (rows["seq_len"] == n)].iloc[0]
        assert r["vs_dense"] == pytest.approx(s["latency.forward.p50"] / d["latency.forward.p50"])
        assert r["recall"] == pytest.approx(s["metric.recall"])
        assert r["index_ms"] != r["index_ms"]  # star attention builds no index: NaN, shown "-"
    text = (tmp_path / "out" / "table.md").read_text()
    assert "## 48 tokens" in text and "## 96 tokens" in text
    dense_line = next(ln for ln in text.splitlines() if ln.startswith("| dense "))
    assert "| 1.00 " in dense_line  # dense against itself
    h = df[df["method"] == "hyper_attention"].iloc[-1]
    line = next(ln for ln in text.splitlines() if ln.startswith("Hardness"))
    assert f"alpha = {h['metric.hardness_alpha']:.3g}" in line and f"kappa = {h['metric.hardness_kappa']:.3g}" in line
    assert text.count("Hardness") == 1  # at 48 tokens only: no method at 96 has the diagnostic


def test_real_rows_join_by_label_with_the_8k_table():
    import pandas as pd

    from analysis import prefill

    kernel = pd.DataFrame([
        {"label": "dense", "method": "dense", "impl": "sdpa", "seq_len": 64, "status": "ok", "index_ms": None,
         "attention_ms": None, "total_ms": 2.0, "vs_dense": 1.0, "density": 1.0, "recall": 1.0},
        {"label": "seer_attention selection=topk", "method": "seer_attention", "impl": "triton", "seq_len": 64,
         "status": "ok", "index_ms": 0.5, "attention_ms": 1.0, "total_ms": 1.5, "vs_dense": 0.75, "density": 0.2,
         "recall": 0.6}])
    real = pd.DataFrame([{"label": "seer_attention selection=topk", "ppl": 25.0, "needle": 0.4, "real_recall": 0.9,
                          "real_density": 0.3, "model_prefill_ms": 40.0, "model_index_ms": 3.0, "real_status": "ok"}])
    ((n, t),) = prefill.tables(kernel, real)
    seer = t[t["method"] == "seer_attention selection=topk"].iloc[0]
    assert (seer["real recall"], seer["ppl"], seer["needle"], seer["model index ms"]) == ("0.900", "25.00", "40%", "3.0")
    assert t.iloc[0]["method"] == "dense" and t.iloc[0]["ppl"] == "-"
    pts = prefill.points(kernel.assign(recall=kernel["recall"]), real, 64, 64)
    assert pts.set_index("label").loc["seer_attention selection=topk", "recall"] == 0.9  # the real recall at 8k
    assert prefill.label("seer_attention", {"selection": "threshold", "threshold": 5e-4}) == \
        "seer_attention selection=threshold"
    assert prefill.label("hip", {"top_k": 512}) == "hip"


def test_prefill_family_check_refuses_without_cuda_and_unknown_methods(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "prefill_family_check.py"
    spec = importlib.util.spec_from_file_location("prefill_family_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--methods", "sparge,nope"])
    assert "unknown methods ['nope']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            mod.main(["--methods", "sparge"])
        assert "no CUDA device" in capsys.readouterr().err


def test_seer_topk_is_an_equal_budget_operating_point_and_threshold_has_no_knob():
    from methods import budget

    q, k, v = seeded_qkv(B=1, H=2, Hkv=1, T=128, D=8, dtype=torch.float32, seed=5)
    kw = dict(num_heads=2, num_kv_heads=1, head_dim=8, impl="reference", gate="untrained", block_size=8,
              hidden_size=8, last_block_dense=False)
    torch.manual_seed(0)
    m = methods.load("seer_attention", selection="topk", **kw)
    for target in (0.3, 0.6):
        fit = budget.fit_density(m, q, k, v, True, target)
        assert fit.knob == "nz_ratio" and 0 < fit.value <= 1
        grid = []
        for r in torch.linspace(0.02, 1.0, 50).tolist():
            g = methods.load("seer_attention", selection="topk", nz_ratio=r, **kw)
            g.load_state_dict(m.state_dict())  # the same gate
            with torch.no_grad():
                g(q, k, v, causal=True)
            grid.append(abs(g.last_density - target))
        assert abs(fit.density - target) <= min(grid) + 1e-12
    assert budget.knob(methods.load("seer_attention", selection="threshold", **kw)) is None
    d = methods.load("seer_attention", selection="topk", nz_ratio=0.25, **kw).describe(q, k, v, True)
    assert d["operating_point"] == "topk nz_ratio 0.25"


@pytest.mark.parametrize("size", ["gpu", "cpu"])
def test_prefill_table_script_commands_compose_and_build(size, compose_cfg, tmp_path):
    """Every attnbench call scripts/prefill_table.sh makes (GPU and CPU sizes, both parts), its
    sweeps expanded: the overrides compose, the runner takes them, and each method builds at the
    call's shape (a renamed key fails here, not in a GPU call). The calls are caught by an
    ATTNBENCH that writes its arguments down; nothing runs."""
    import itertools
    import os
    import shlex
    import subprocess
    from pathlib import Path

    from hydra.utils import instantiate

    from runners import with_impl

    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "calls.txt"
    fake = tmp_path / "ab.sh"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {log}\necho >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "SIZE": size, "OUT": str(tmp_path / "out"), "ATTNBENCH": str(fake), "PYTHON": "true",
           "SEER_GATE": str(tmp_path / "absent.pt"), "ATTNBENCH_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(["bash", str(root / "scripts/prefill_table.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    calls = [shlex.split(line) for line in log.read_text().splitlines() if line.strip()]
    assert len(calls) == 19  # kernel: 4 groups x 2 passes + HyperAttention; real, RULER: 4 groups + HyperAttention each
    seen, built = set(), 0
    for call in calls:
        assert call[0] == "-m"
        args = [a for a in call[1:] if not a.startswith("store=")]
        sweeps = [[f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")]
                  if "," in a and not a.split("=", 1)[1].startswith("[") else [a] for a in args]
        for combo in itertools.product(*sweeps):
            cfg = with_impl(compose_cfg(*combo, tiny=False))
            runner = instantiate(cfg.runner)
            kernel = type(runner).__name__ == "KernelRunner"
            if kernel:
                m = cfg.model
                shape = dict(num_heads=m.num_heads, head_dim=m.head_dim, num_kv_heads=m.num_kv_heads)
                assert runner.recall_rows and runner.causal is True
            else:
                shape = dict(num_heads=9, head_dim=64, num_kv_heads=3)  # SmolLM2-135M
                if cfg.task._target_ == "tasks.ruler.Ruler":  # RULER at the lengths the dense model answers
                    assert cfg.task.token_lengths == ([2000, 4000] if size == "gpu" else [256])
                else:
                    assert cfg.task.seq_len == (8192 if size == "gpu" else 512)
                    if size == "gpu":
                        assert runner.timed_tasks == ["perplexity"] and cfg.task.token_lengths == [8000]
            if size == "gpu" and kernel:
                assert (m.num_heads, m.num_kv_heads, m.head_dim) == (9, 3, 64) and cfg.dtype == "bfloat16"
            method = methods.build(cfg.method, max_seq_len=8192, **shape)
            assert method.impl == cfg.method.impl
            seen.add((cfg.method._target_.rsplit(".", 1)[1], "kernel" if kernel else cfg.task._target_))
            built += 1
    names = {n for n, _ in seen}
    assert names == {"Dense", "MInference", "NSA", "SampleAttention", "SpargeAttn", "MoA", "S2Attention",
                     "StarAttention", "SeerAttention", "HiP", "HyperAttention"}
    assert all((n, t) in seen for n in names for t in ("kernel", "tasks.perplexity.Perplexity",
                                                        "tasks.needle.Needle", "tasks.fidelity.Fidelity",
                                                        "tasks.ruler.Ruler"))


def test_kernel_runner_records_a_methods_hardness_on_the_timed_inputs(compose_cfg, monkeypatch):
    """HyperAttention's alpha and kappa (its ``hardness``) land in the record, computed on the
    q, k of the timed length; above the runner's cap they are skipped and the record says so."""
    from methods.hyper_attention import HyperAttention
    from runners import run
    from runners.kernel import KernelRunner

    seen = []

    def spy(self, q, k):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return {"alpha": 1.5 + len(seen), "kappa": 2.0}

    monkeypatch.setattr(HyperAttention, "hardness", spy)
    monkeypatch.setattr(KernelRunner, "HARDNESS_MAX_LEN", 64)
    recs = run(compose_cfg("method=hyper_attention", "method.min_seq_len=16", "method.block_size=16",
                           "method.sample_size=8", "runner.seq_lens=[48,96]", "runner.causal=true"))
    assert [r.status for r in recs] == ["ok", "ok"], [r.error for r in recs]
    assert len(seen) == 1 and seen[0][0][2] == 48 and seen[0][1][2] == 48  # one call, on the 48-token q, k
    assert recs[0].metrics["hardness_alpha"] == 2.5 and recs[0].metrics["hardness_kappa"] == 2.0
    assert "48 tokens" in recs[0].details["hardness"]
    assert "hardness_alpha" not in recs[1].metrics and "not computed above 64" in recs[1].details["hardness"]
    plain = run(compose_cfg("method=sliding_window", "method.impl=reference", "runner.seq_lens=[48]"))
    assert plain and "hardness" not in plain[0].details  # a method without the diagnostic: nothing


def test_real_rows_average_the_ruler_lengths_and_name_a_failed_ruler_run():
    import pandas as pd

    from analysis import prefill

    def rec(method, task, t, status="ok", **metrics):
        return {"runner": "pretrained", "method": method, "method_params": {}, "task": task, "time": t,
                "status": status, "error": None if status == "ok" else "boom",
                **{f"metric.{k}": v for k, v in metrics.items()}}

    df = pd.DataFrame([rec("dense", "ruler", 1, **{"ruler@2000": 0.5, "ruler@4000": 0.25}),
                       rec("sparge", "ruler", 2, **{"ruler@2000": 0.75, "ruler@4000": 0.0}),
                       rec("sparge", "ruler", 3, **{"ruler@2000": 1.0, "ruler@4000": 1.0}),  # the newest counts
                       rec("hip", "ruler", 4, status="failed")])
    rows = prefill.real_rows(df).set_index("label")
    assert rows.loc["dense", "ruler"] == pytest.approx(0.375)
    assert rows.loc["sparge", "ruler"] == pytest.approx(1.0)
    assert rows.loc["hip", "ruler"] != rows.loc["hip", "ruler"]  # NaN
    assert rows.loc["hip", "real_status"].startswith("ruler: ")
