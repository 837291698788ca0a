"""Leaderboard and plots on fixture records, failed and OOM runs included."""
import json

import pandas as pd
import pytest

from analysis.plots import latency_memory
from analysis.records import load, variants
from analysis.render import render
from analysis.tables import kernel_table, settings
from runners import records


def _rec(method, T, status="ok", ms=1.0, params=None, impl="sdpa", causal=False, **kw):
    return {"run_id": f"{method}-{json.dumps(params)}-{T}-{causal}", "time": "2026-01-01T00:00:00",
            "method": method, "impl": impl, "real_kernel": True, "model": "attn_op", "task": "fidelity",
            "runner": "kernel", "seq_len": T, "batch_size": 1, "dtype": "float32", "device": "cpu",
            "causal": causal, "status": status, "error": None if status == "ok" else "boom",
            "seed": 0, "method_params": params or {}, "env": {}, "details": {},
            "metrics": {"rel_err_random": 0.1} if status == "ok" else {},
            "latency_ms": {"forward": {"p20": ms, "p50": ms, "p80": ms}} if status == "ok" else {},
            "peak_mem_bytes": {"forward": 2**20} if status == "ok" else {},
            "cost": {"flops": 1.0, "density": 0.5, "kv_bytes": 1.0} if status == "ok" else None, **kw}


def _store(tmp_path, recs):
    path = tmp_path / "r.jsonl"
    for r in recs:
        records.append(path, r)
    return path


def test_failed_and_oom_runs_show_their_status_not_zeros(tmp_path):
    path = _store(tmp_path, [
        _rec("dense", 256, ms=2.0, params={"backend": "auto"}), _rec("dense", 512, ms=8.0, params={"backend": "auto"}),
        _rec("dense", 512, ms=16.0, params={"backend": "flash"}),
        _rec("nsa", 256, ms=1.0, impl="flex"), _rec("nsa", 512, status="oom", impl="flex"),
        _rec("bigbird", 256, status="failed_correctness", impl="flex"),
    ])
    table = kernel_table(load(path))
    rows = {r["method"]: r for _, r in table.iterrows()}
    assert set(rows) == {"dense backend=auto", "dense backend=flash", "nsa", "bigbird"}
    assert rows["nsa"]["fwd ms @512"] == "oom" and rows["nsa"]["fwd ms @256"] == "1.000"
    assert rows["bigbird"]["fwd ms @256"] == "failed_correctness: boom"  # the status and its reason
    assert rows["dense backend=flash"]["speedup @512"] == "0.50x"  # against the default backend
    assert rows["dense backend=auto"]["speedup @512"] == "1.00x"
    assert "oom" in render(load(path))
    png = latency_memory(load(path), tmp_path / "f.png", "fixture")
    assert png.stat().st_size > 1000


def test_latest_record_per_run_id_wins(tmp_path):
    a = _rec("dense", 256, ms=2.0)
    b = {**a, "time": "2026-01-02T00:00:00", "latency_ms": {"forward": {"p20": 3, "p50": 3, "p80": 3}}}
    df = load(_store(tmp_path, [a, b]))
    assert len(df) == 1 and df["latency.forward.p50"].iloc[0] == 3


def test_a_later_run_of_the_same_measurement_replaces_it_and_only_seeds_average(tmp_path):
    """Two runs (two run_ids: another list of lengths, a later commit) that timed the same
    method, length and seed: the later one counts, not their mean as if they were seeds."""
    old = _rec("sparsek", 256, ms=4.0, impl="triton", run_id="a")
    new = _rec("sparsek", 256, ms=1.0, impl="triton", run_id="b", time="2026-01-02T00:00:00")
    other_seed = _rec("sparsek", 256, ms=3.0, impl="triton", run_id="c", seed=1)
    t = kernel_table(load(_store(tmp_path, [new, old]))).set_index("method")
    assert t.loc["sparsek", "fwd ms @256"] == "1.000"
    t = kernel_table(load(_store(tmp_path / "x", [old, new, other_seed]))).set_index("method")
    assert t.loc["sparsek", "fwd ms @256"].startswith("2.000 ± ")  # seeds 0 (newest: 1.0) and 1 (3.0)


def test_head_dims_get_their_own_tables(tmp_path):
    """Records of another attention shape (here D=64) are a setting of their own, not rows
    mixed into the D=128 table."""
    shape = lambda d: {"config": {"model": {"num_heads": 32, "num_kv_heads": 32, "head_dim": d}}}  # noqa: E731
    recs = [_rec(m, 256, ms=ms, run_id=f"{m}-{d}", **shape(d)) for d in (64, 128)
            for m, ms in (("dense", 2.0 if d == 64 else 4.0), ("performer", 1.0))]
    titles = [t for t, _ in settings(load(_store(tmp_path, recs)))]
    assert titles == ["cpu, float32, non-causal, H=32 Hkv=32 D=128", "cpu, float32, non-causal, H=32 Hkv=32 D=64"]
    text = render(load(tmp_path / "r.jsonl"))
    assert "2.00x" in text and "4.00x" in text  # each against the dense run of its own shape


def test_a_run_timed_with_its_backward_is_its_own_row_named_by_its_timed_passes(tmp_path):
    fwd = _rec("sliding_window", 256, ms=1.0, run_id="f", config={"runner": {"backward": False}},
               cost={"flops": 3e9, "density": 0.5, "kv_bytes": 1.0})
    both = _rec("sliding_window", 256, ms=3.0, run_id="b", config={"runner": {"backward": True}},
                latency_ms={"forward": {"p20": 3.0, "p50": 3.0, "p80": 3.0}, "backward": {"p20": 5.0, "p50": 5.0, "p80": 5.0}})
    failed = _rec("bigbird", 256, status="oom", run_id="o", config={"runner": {"backward": True}})
    t = kernel_table(load(_store(tmp_path, [fwd, both, failed]))).set_index(["method", "timed"])
    assert list(t.index) == [("bigbird", "forward+backward"),  # no timings: what it was to time
                             ("sliding_window", "forward"), ("sliding_window", "forward+backward")]
    assert t.loc[("sliding_window", "forward"), "fwd ms @256"] == "1.000"  # not the mean of two "seeds"
    assert t.loc[("sliding_window", "forward+backward"), "fwd ms @256"] == "3.000"
    assert t.loc[("sliding_window", "forward+backward"), "bwd ms @256"] == "5.000"
    assert t.loc[("sliding_window", "forward"), "bwd ms @256"] == "-"
    assert t.loc[("bigbird", "forward+backward"), "fwd ms @256"] == "oom"  # an OOM is its own reason
    assert t.loc[("sliding_window", "forward"), "useful TFLOP/s @256"] == "3"  # 3 GFLOP of work in 1 ms


def test_timed_passes_come_from_the_latency_keys():
    from analysis.records import timed_passes

    q = {"p50": 1.0}
    assert timed_passes({"latency_ms": {"forward": q}, "config": {"runner": {"backward": True}}}) == "forward"
    assert timed_passes({"latency_ms": {"backward": q, "forward": q}}) == "forward+backward"
    assert timed_passes({"latency_ms": {"backward": q}}) == "backward"
    assert timed_passes({"latency_ms": {}, "config": {"runner": {"backward": "auto"}}}) == "forward"


def test_variants_name_only_what_differs():
    df = pd.DataFrame({"method": ["m", "m", "d"],
                       "method_params": [{"pattern": "a", "w": 1}, {"pattern": "b", "w": 1}, {"x": 1}]})
    assert list(variants(df)) == ["m pattern=a", "m pattern=b", "d"]


def test_variants_fill_a_key_older_records_lack_with_its_config_default():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf/method/sparsek.yaml"
    default = OmegaConf.load(conf).kernel_chunk  # a key added after records existed
    old, new, other = {"k": 256, "impl": "triton"}, {"k": 256, "impl": "triton", "kernel_chunk": default}, \
        {"k": 256, "impl": "triton", "kernel_chunk": default // 2}
    df = pd.DataFrame({"method": ["sparsek"] * 3, "method_params": [old, new, other]})
    labels = list(variants(df))
    assert labels[0] == labels[1] == f"sparsek kernel_chunk={default}" and labels[2] == f"sparsek kernel_chunk={default // 2}"
    assert list(variants(df.iloc[:2])) == ["sparsek", "sparsek"]  # nothing differs: no key named


def test_readme_generated_sections_are_up_to_date():
    from analysis import readme

    assert readme.main(["--check"]) == 0, "run `python -m analysis.readme`"
    text = (readme.ROOT / "README.md").read_text()
    for block in ("methods", "efficiency"):
        start = text.index(f"<!-- {block}:start -->")
        stale = text[:start] + text[start:].replace("| `sliding_window` ", "| `sliding_windoww` ", 1).replace(
            "| sliding_window ", "| sliding_windoww ", 1)
        assert stale != text and readme.render_readme(stale) == text  # regenerating restores it


def test_method_table_covers_the_registry_and_names_tests_that_exist():
    import methods
    from analysis.readme import ROOT
    from analysis.tables import method_table

    t = method_table(ROOT / "conf").set_index("method")
    assert list(t.index) == [f"`{m}`" for m in methods.available()]
    assert t.loc["`linformer`", "causal"] == "no" and t.loc["`nsa`", "causal"] == "only"
    assert t.loc["`performer`", "impls"] == "reference, chunked, triton"
    assert "`num_features` 256" in t.loc["`performer`", "hyperparameters (defaults)"]
    named = [c.strip("`") for c in t["matches official code"] if c != "no test yet"]
    for test in named:
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), f"{test} does not exist"


def test_sweep_summary_adds_up_the_job_files(tmp_path):
    from types import SimpleNamespace

    from analysis.sweep import jobs, summarize
    from runners.callbacks import write_job_summary

    for job, statuses in (("0", ["ok", "ok"]), ("1", ["oom"]), ("10", [])):
        (tmp_path / job).mkdir()
        recs = [SimpleNamespace(status=s, error=None if s == "ok" else "out of memory") for s in statuses]
        write_job_summary(tmp_path / job, recs, started=0.0)
    assert [j["job"] for j in jobs(tmp_path)] == ["0", "1", "10"]
    (tmp_path / "11").mkdir()  # a job that crashed before writing its file
    s = summarize(tmp_path)
    assert s == {"jobs": 4, "records_ok": 2, "records_failed": 1, "by_status": {"ok": 2, "oom": 1},
                 "jobs_skipped": 1, "jobs_failed": 2, "jobs_crashed": ["11"], "errors": ["out of memory"]}


def test_reproduce_compares_ours_with_theirs(tmp_path):
    from analysis.reproduce import main as reproduce_main
    from analysis.reproduce import table

    (tmp_path / "s").mkdir()
    lra = _rec("dense", 2000, runner="train", task="lra/listops")
    lra["metrics"] = {"test_acc": 0.362}
    eff = [_rec("dense", 4096, ms=10.0, params={"backend": "auto"}, causal=True),
           _rec("nsa", 4096, ms=2.0, impl="flex", causal=True)]
    for r in [lra]:
        records.append(tmp_path / "s/lra.jsonl", r)
    for r in eff:
        records.append(tmp_path / "s/eff.jsonl", r)
    entries = [
        {"id": "a", "metric": "acc", "value": 36.37, "tolerance": 1.0, "source": "x",
         "ours": {"store": "s/lra.jsonl", "method": "dense", "task": "lra/listops", "metric": "test_acc", "scale": 100}},
        {"id": "b", "metric": "speedup", "value": 9.0, "tolerance": 2.0, "source": "y",
         "ours": {"store": "s/eff.jsonl", "method": "nsa", "seq_len": 4096, "causal": True, "speedup": True}},
        {"id": "c", "metric": "acc", "value": 18.0, "tolerance": 1.0, "source": "z",
         "ours": {"store": "s/lra.jsonl", "method": "performer", "task": "lra/listops", "metric": "test_acc"}},
    ]
    t = table(entries, tmp_path).set_index("id")
    assert t.loc["a", "ours"] == "36.20" and t.loc["a", "within"] == "yes"
    assert t.loc["b", "ours"] == "5.00" and t.loc["b", "within"] == "no" and t.loc["b", "difference"] == "-4.00"
    assert t.loc["c", "ours"] == "not run" and t.loc["c", "within"] == "-"
    assert reproduce_main([]) == 0  # the committed data file against the committed records


def test_reproduce_takes_a_speedup_from_the_peer_timings(tmp_path):
    from analysis.reproduce import table

    rows = [{"name": "cudnn", "seq_len": 64, "latency_ms": {"p50": 6.0}},
            {"name": "ours", "seq_len": 64, "latency_ms": {"p50": 3.0}},
            {"name": "ours", "seq_len": 64, "latency_ms": {"p50": 2.0}},  # newest wins
            {"name": "ours", "seq_len": 128, "error": "boom"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sel = {"peers": "p.jsonl", "kernel": "ours", "baseline": "cudnn"}
    entries = [{"id": i, "metric": "x", "value": 3.0, "tolerance": 0.5, "source": "s", "ours": {**sel, "seq_len": T}}
               for i, T in (("at64", 64), ("at128", 128))]
    t = table(entries, tmp_path).set_index("id")
    assert t.loc["at64", "ours"] == "3.00" and t.loc["at64", "within"] == "yes"
    assert t.loc["at128", "ours"] == "not run"


def test_leaderboard_plots_skip_a_setting_that_only_failed(tmp_path):
    from analysis.leaderboard import main as leaderboard_main

    recs = [_rec("dense", 256, ms=1.0, params={"backend": "auto"}), _rec("sliding_window", 256, ms=0.5, impl="flex"),
            _rec("performer", 256, status="error", causal=True)]  # a causal setting where all failed
    for r in recs[:2]:
        r["metrics"]["rel_err_structured"] = 0.1
    store = _store(tmp_path, recs)
    assert leaderboard_main(["--store", str(store), "--plot", str(tmp_path / "lat.png"),
                             "--pareto", str(tmp_path / "q.png")]) == 0
    assert (tmp_path / "lat.png").exists() and not (tmp_path / "lat-1.png").exists()
    assert "error" in render(load(store))


def test_efficiency_length_and_pareto(tmp_path):
    from analysis.plots import pareto_front, quality_vs_cost
    from analysis.tables import efficiency_lengths

    recs = []
    for T, d_ms, s_ms in ((256, 1.0, 2.0), (512, 4.0, 3.0), (1024, 16.0, 6.0)):
        recs.append(_rec("dense", T, ms=d_ms, params={"backend": "auto"}))
        recs.append(_rec("sliding_window", T, ms=s_ms, impl="flex"))
    recs.append(_rec("slowpoke", 1024, ms=100.0, impl="flex"))
    df = load(_store(tmp_path, recs))
    eff = efficiency_lengths(df).set_index("method")
    assert eff.loc["sliding_window", "faster from"] == "512"
    assert eff.loc["slowpoke", "faster from"] == "> 1024"
    assert pareto_front([(1, 5), (2, 1), (3, 3), (1, 6)]) == [0, 1]
    png = quality_vs_cost(df, tmp_path / "p.png", "fixture", quality="metric.rel_err_random")
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="no records carry metric.rel_err_structured"):
        quality_vs_cost(df, tmp_path / "q.png")


def test_notebooks_run_on_fixture_records(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from analysis.readme import ROOT

    recs = [_rec("dense", 256, ms=1.0, params={"backend": "auto"}), _rec("nsa", 256, status="oom", impl="flex"),
            _rec("sliding_window", 256, ms=0.5, impl="flex")]
    for r in recs:
        r["metrics"]["rel_err_structured"] = 0.1 if r["status"] == "ok" else None
    store = _store(tmp_path, recs)
    monkeypatch.setenv("ATTNBENCH_STORE", str(store))
    monkeypatch.setenv("ATTNBENCH_FIGS", str(tmp_path / "figs"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebooks = sorted((ROOT / "analysis/notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
        outputs = "".join(str(o) for c in nb.cells for o in c.get("outputs", []))
        assert "3 records" in outputs and "oom" in outputs
    assert len(list((tmp_path / "figs").glob("*.png"))) >= 2


def test_seeds_give_mean_and_bootstrap_interval_and_best_is_marked(tmp_path):
    from analysis.render import mark_best
    from analysis.tables import bootstrap_ci

    recs = [_rec("dense", 256, ms=2.0, params={"backend": "auto"})]
    for seed, ms in enumerate((1.0, 1.2, 0.8)):
        r = _rec("sliding_window", 256, ms=ms, impl="flex")
        r["run_id"] += f"-s{seed}"
        r["seed"] = seed
        recs.append(r)
    df = load(_store(tmp_path, recs))
    t = kernel_table(df).set_index("method")
    cell = t.loc["sliding_window", "fwd ms @256"]
    assert cell.startswith("1.000 ± ")
    m, lo, hi = bootstrap_ci([1.0, 1.2, 0.8])
    assert m == pytest.approx(1.0) and 0.8 <= lo < 1.0 < hi <= 1.2
    marked = mark_best(kernel_table(df)).set_index("method")
    assert marked.loc["sliding_window", "fwd ms @256"].startswith("**1.000")
    assert marked.loc["sliding_window", "speedup @256"] == "**2.00x**"
    assert "\\textbf{" in render(df, "latex") and "sliding_window,flex" in render(df, "csv")
    html = render(df, "html")
    assert "<b>2.00x</b>" in html and html.count("<table") == 1
    with pytest.raises(ValueError, match="unknown leaderboard format 'xls'"):
        render(df, "xls")


def test_readmes_link_only_to_files_in_the_repository():
    import re

    from analysis.readme import ROOT

    pages = [ROOT / "README.md", ROOT / "docs/design.md", *sorted(ROOT.glob("results/*/README.md"))]
    assert len(pages) >= 6
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            assert "://" not in target, f"{page.name} links outside the repository: {target}"
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{page} links to a missing {target}"
    assert "](docs/design.md)" in (ROOT / "README.md").read_text()
