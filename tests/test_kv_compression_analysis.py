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
    assert "| snapkv | 0.75 (0.45) |" in text and "recovery 0.95: 1.00 (0.10)" in text and "no press: 1.00 (0.00)" in text
    assert "### multiturn (query_agnostic)" in text and "0.25 (0.80) [0.50, 0.00]" in text
    assert kv_compression.frontier(df, tmp_path / "f.png").stat().st_size > 1000
