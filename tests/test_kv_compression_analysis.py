"""analysis/kv_compression.py on hand-written records: accuracy per task, the measured compression
(1 - kv_share_held), the newest record per setting, the table's cells and the frontier plot."""
import json

from analysis import kv_compression


def _rec(method, task, acc, share=None, ratio=None, recovery=None, setting="query_aware", time="2026-01-01T00:00:00",
         turns=None):
    params = {k: v for k, v in (("ratio", ratio), ("recovery", recovery)) if v is not None}
    if task == "needle":
        metrics = {"needle@256": acc, "needle@512": acc}
    elif task == "ruler":
        metrics = {"average": acc}
    else:
        metrics = {"accuracy": acc, **{f"multiturn_turn{i + 1}": t for i, t in enumerate(turns or [])}}
    if share is not None:
        metrics["kv_share_held"] = share
    return {"run_id": f"{method}{task}{ratio}{recovery}{setting}{time}", "status": "ok", "time": time, "method": method,
            "task": task, "method_params": params, "metrics": metrics, "details": {"setting": setting},
            "config": {"task": {}}}


def test_rows_table_and_frontier(tmp_path):
    recs = [_rec("dense", "needle", 1.0), _rec("snapkv", "needle", 0.5, 0.6, ratio=0.5),
            _rec("snapkv", "needle", 0.75, 0.55, ratio=0.5, time="2026-01-02T00:00:00"),  # newer: wins
            _rec("fastgen", "needle", 1.0, 0.9, recovery=0.95),
            _rec("h2o", "multiturn", 0.25, 0.2, ratio=0.75, setting="query_agnostic", turns=[0.5, 0.0])]
    store = tmp_path / "r.jsonl"
    store.write_text("".join(json.dumps(r) + "\n" for r in recs))
    df = kv_compression.rows(store)
    assert len(df) == 4
    snap = df[df["method"] == "snapkv"].iloc[0]
    assert snap["accuracy"] == 0.75 and abs(snap["compression"] - 0.45) < 1e-12
    assert df[df["method"] == "dense"].iloc[0]["compression"] == 0.0
    text = kv_compression.table(df)
    assert "| snapkv | 0.75 (0.45) {256: 0.75, 512: 0.75} |" in text and "recovery 0.95: 1.00 (0.10)" in text and "no press: 1.00 (0.00)" in text
    assert "### multiturn (query_agnostic)" in text and "0.25 (0.80) [0.50, 0.00]" in text
    assert kv_compression.frontier(df, tmp_path / "f.png").stat().st_size > 1000
    assert snap["by_length"] == {256: 0.75, 512: 0.75} and "0.75 (0.45) {256: 0.75, 512: 0.75}" in text


def test_accuracy_per_prompt_length(tmp_path):
    """Records of two prompt lengths: the per-length accuracies (``<task>@<n>``) in the rows and
    the table's cells; one row of frontier panels per length."""
    rec = _rec("snapkv", "ruler", 0.5, 0.5, ratio=0.5)
    rec["metrics"].update({"ruler@4000": 0.75, "ruler@8000": 0.25})
    store = tmp_path / "r.jsonl"
    store.write_text(json.dumps(rec) + "\n" + json.dumps(_rec("dense", "ruler", 1.0)) + "\n")
    df = kv_compression.rows(store)
    assert df[df["method"] == "snapkv"].iloc[0]["by_length"] == {4000: 0.75, 8000: 0.25}
    assert "0.50 (0.50) {4000: 0.75, 8000: 0.25}" in kv_compression.table(df)
    import matplotlib.image

    one = matplotlib.image.imread(kv_compression.frontier(df.assign(by_length=[{}] * len(df)), tmp_path / "a.png"))
    two = matplotlib.image.imread(kv_compression.frontier(df, tmp_path / "b.png"))
    assert two.shape[0] > 1.8 * one.shape[0]  # two rows of panels


def test_the_sweep_runs_dense_first_then_one_ratio_at_a_time_over_every_task_and_press(tmp_path):
    """scripts/kv_compression.py's plan: every (task, press, ratio) once and FastGen at each
    recovery; dense first; ratio slot i of every task before slot i + 1 (a budget cut loses the
    last slots of every task alike); each run composes as the CLI's config."""
    from scripts.kv_compression import FASTGEN_RECOVERY, PRESSES, RATIOS, TASKS, jobs

    plan = jobs(PRESSES, RATIOS, TASKS, ["query_agnostic"], [4000, 8000], False)
    key = lambda o: next(x for x in o if x.startswith("method="))[7:]  # noqa: E731
    knob = lambda o: next((x.split("=")[1] for x in o if x.startswith(("press.ratio=", "method.recovery="))), None)  # noqa: E731
    task = lambda o: next(x for x in o if x.startswith("task="))[5:]  # noqa: E731
    assert [key(o) for o in plan[:3]] == ["dense"] * 3 and {task(o) for o in plan[:3]} == set(TASKS)
    got = {(task(o), key(o), knob(o)) for o in plan[3:]}
    want = {(t, p, str(r)) for t in TASKS for p in PRESSES if p != "fastgen" for r in RATIOS} | \
        {(t, "fastgen", str(r)) for t in TASKS for r in FASTGEN_RECOVERY}
    assert got == want and len(plan) == 3 + len(want)
    slot = [RATIOS.index(float(knob(o))) if key(o) != "fastgen" else FASTGEN_RECOVERY.index(float(knob(o)))
            for o in plan[3:]]
    assert slot == sorted(slot)
    assert all("task.token_lengths=[4000,8000]" in o for o in plan)
    assert all("press.setting=query_agnostic" in o for o in plan[3:] if task(o) == "multiturn")
    from hydra import compose, initialize_config_dir

    from methods import CONF_DIR
    from runners import with_press

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for o in plan:
            cfg = with_press(compose(config_name="config", overrides=[*o, f"store={tmp_path / 'r.jsonl'}",
                                                                      "+runner.timed_tasks=[]"]))
            assert list(cfg.task.token_lengths) == [4000, 8000] and cfg.runner.timed_tasks == []


def test_the_sweeps_workers_split_the_grid_and_run_each_run_once(tmp_path):
    """--workers 2: two processes on one store; every planned run is recorded exactly once (the
    runs' claims make a work queue), and the report is written after both finished."""
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from models import pretrained

    if not (pretrained.cache_dir() / "smollm2_135m" / "MANIFEST.json").exists():
        pytest.skip("SmolLM2 is not fetched (python scripts/fetch_assets.py)")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "kv"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "kv_compression.py"), "--cpu-tiny", "--tasks", "needle",
                           "--presses", "streaming_llm_press", "random_press", "--ratios", "0.5", "--workers", "2",
                           "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(r["method"] for r in recs) == ["dense", "random_press", "streaming_llm_press"]
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    assert proc.stdout.count("done in") == 1 and (out / "table.md").exists() and (out / "frontier.png").exists()
    assert "skipped" in proc.stdout  # the other worker met each run claimed or done


def test_ruler_runs_at_its_own_lengths_and_dense_at_every_length():
    """--ruler-lengths: the presses' RULER runs at those lengths; dense RULER at those and the
    other tasks' lengths (its record shows where dense itself scores nothing); other tasks unchanged."""
    from scripts.kv_compression import RULER_TASKS, jobs

    plan = jobs(["snapkv"], [0.5], ["needle", "ruler"], ["query_agnostic"], [4000, 8000], False,
                ruler_lengths=[2000, 4000])
    ruler = [o for o in plan if "task=ruler" in o]
    assert len(ruler) == 2 and "method=dense" in ruler[0] and "method=snapkv" in ruler[1]
    assert "task.token_lengths=[2000,4000,8000]" in ruler[0] and "task.token_lengths=[2000,4000]" in ruler[1]
    assert all(f"task.tasks=[{','.join(RULER_TASKS)}]" in o for o in ruler)
    assert all("task.token_lengths=[4000,8000]" in o for o in plan if "task=needle" in o)
