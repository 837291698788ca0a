"""scripts/mqar_report.py: one row per method asked for, failures with their error, methods
without a record as not run, the newest record of a method counting, and the plot written."""
import json

from scripts import mqar_report


def _rec(method, status="ok", acc=None, state=None, error=None):
    return {"method": method, "task": "mqar", "status": status, "error": error, "device": "cpu",
            "metrics": {} if acc is None else {"test_acc": acc, "val_acc": acc, "state_bytes": state,
                                               "state_constant": state is not None and state < 5000},
            "train": {"steps": 7, "wall_s": 1.0},
            "config": {"task": {"num_kv_pairs": 4, "max_len": 32, "vocab_size": 64}, "model": {"depth": 2, "dim": 32}}}


def test_table_rows_failures_not_run_and_newest(tmp_path):
    store = tmp_path / "records.jsonl"
    recs = [_rec("dense", acc=0.1, state=8192), _rec("dense", acc=0.9, state=8192),
            _rec("based", acc=0.5, state=2048), _rec("nsa", status="error", error="CUDA only kernel")]
    store.write_text("".join(json.dumps(r) + "\n" for r in recs))
    mqar_report.main(["--store", str(store), "--methods", "dense,based,nsa,lightning", "--out", str(tmp_path)])
    lines = (tmp_path / "table.md").read_text().splitlines()
    rows = {ln.split("|")[1].strip(): ln for ln in lines if ln.startswith("| ") and "method" not in ln}
    assert set(rows) == {"dense", "based", "nsa", "lightning"}
    assert "0.900" in rows["dense"] and "0.100" not in rows["dense"]  # the newest record
    assert "| yes |" in rows["based"] and "| no |" in rows["dense"]
    assert "error" in rows["nsa"] and "CUDA only kernel" in rows["nsa"]
    assert "not run" in rows["lightning"]
    order = [ln.split("|")[1].strip() for ln in lines if ln.startswith("| ") and "method" not in ln]
    assert order[:2] == ["dense", "based"]  # best recall first
    assert (tmp_path / "recall_vs_state.png").stat().st_size > 0


def test_presses_and_decode_selectors_are_marked_as_dense_forward():
    assert mqar_report.dense_forward("h2o").startswith("dense: a KV-cache press")
    assert mqar_report.dense_forward("quest").startswith("dense: a decode-time selector")
    assert mqar_report.dense_forward("eigen_attention") == ""  # a press whose own forward is not dense
    assert mqar_report.dense_forward("nsa") == "" and mqar_report.dense_forward("dense") == ""
    assert mqar_report.dense_forward("not_a_method") == ""
