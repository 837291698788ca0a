"""scripts/decode_speedup.py: each method's decode step time against dense decode's at the same
length, recomputed here from the runner's records."""
import importlib.util
from pathlib import Path

from runners import run

RUN = ["device=cpu", "dtype=float32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16",
       "runner.seq_lens=[32,48]", "runner.steps=3", "runner.warmup=1", "runner.cpu_threads=1"]


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "decode_speedup.py"
    spec = importlib.util.spec_from_file_location("decode_speedup", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_speedup_is_dense_step_over_the_methods(compose_cfg, store, tmp_path):
    recs = {m: run(compose_cfg("runner=decode", f"method={m}", *RUN, *extra, tiny=False))
            for m, extra in (("dense", []), ("quest", ["method.page_size=4", "method.token_budget=8"]))}
    step = {(m, r.seq_len): r.latency_ms["decode_step"]["p50"] for m, rs in recs.items() for r in rs}
    read = {(m, r.seq_len): r.metrics["read_fraction"] for m, rs in recs.items() for r in rs}
    mod = _script()
    out = tmp_path / "speedup.md"
    assert mod.main(["--store", store, "--out", str(out)]) == 0
    from analysis.records import load
    from analysis.tables import settings

    ((_, g),) = list(settings(load(store), "decode"))
    t = mod.speedup_table(g)
    assert sorted(zip(t["method"], t["L"], strict=True)) == [("dense", 32), ("dense", 48), ("quest", 32), ("quest", 48)]
    for _, r in t.iterrows():
        want = step["dense", r["L"]] / step[r["method"], r["L"]]
        assert r["speed-up"] == f"{want:.1f}x" and r["dense p50 ms"] == f"{step['dense', r['L']]:.3f}"
        assert r["bytes bound"] == f"{1 / read[r['method'], r['L']]:.1f}x"
        assert r["graph ms"] == "-"  # CPU: no CUDA graph
    assert "Decode speed-up against dense decode" in out.read_text()
    assert t[t["method"] == "quest"]["read fraction"].astype(float).lt(1).all()


def test_no_dense_baseline_is_an_error(compose_cfg, store, tmp_path):
    run(compose_cfg("runner=decode", "method=quest", *RUN, tiny=False))
    assert _script().main(["--store", store]) == 1
