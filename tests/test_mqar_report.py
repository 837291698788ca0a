"""scripts/mqar_report.py: one row per method asked for, failures with their error, methods
without a record as not run, the newest record of a method counting, and the plot written."""
import itertools
import json

from scripts import mqar_report

_IDS = itertools.count()  # records need a run_id (runners.records.read)


def _rec(method, status="ok", acc=None, state=None, error=None):
    return {"run_id": f"{method}-{next(_IDS)}", "method": method, "task": "mqar", "status": status, "error": error,
            "device": "cpu",
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


def test_several_stores_make_one_table_with_each_rows_device(tmp_path):
    """A GPU store and a CPU store of the methods it did not reach: one table, the newest record
    of each method, the device per row; records of another setting are refused by name."""
    import pytest

    gpu, cpu = tmp_path / "gpu.jsonl", tmp_path / "cpu.jsonl"
    g = [dict(_rec("dense", acc=0.9, state=8192), device="cuda", env={"gpu": "NVIDIA H200"}, time="2026-12-01"),
         dict(_rec("sea", status="error", error="stopped"), device="cuda", env={"gpu": "NVIDIA H200"}, time="2026-12-01")]
    c = [dict(_rec("sea", acc=0.7, state=8192), time="2026-12-04")]
    gpu.write_text("".join(json.dumps(r) + "\n" for r in g))
    cpu.write_text("".join(json.dumps(r) + "\n" for r in c))
    mqar_report.main(["--store", str(gpu), str(cpu), "--methods", "dense,sea", "--out", str(tmp_path)])
    text = (tmp_path / "table.md").read_text()
    rows = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ") and "method" not in ln}
    assert "NVIDIA H200" in rows["dense"] and "| cpu |" in rows["sea"] and "0.700" in rows["sea"]
    assert "the device in each row" in text
    other = tmp_path / "other.jsonl"
    r = _rec("based", acc=0.5, state=2048)
    r["config"]["task"]["num_kv_pairs"] = 16
    other.write_text(json.dumps(r) + "\n")
    with pytest.raises(ValueError, match="based"):
        mqar_report.main(["--store", str(gpu), str(other), "--out", str(tmp_path)])


def test_density_column_says_when_a_sparse_method_is_dense_at_the_task_length():
    """A sliding window at least as long as the task's sequence attends every causal pair
    (density 1: its row measures dense attention); a shorter one attends fewer; a record whose
    method cannot be built shows none."""
    from omegaconf import OmegaConf

    import methods

    method = OmegaConf.to_container(methods.compose_method("sliding_window"))

    def rec(window):
        r = _rec("sliding_window", acc=0.5, state=8192)
        r["config"]["method"] = {**method, "window": window}
        r["config"]["task"]["max_len"] = 32
        r["config"]["model"].update(heads=2, head_dim=16)
        return r

    assert mqar_report.density_at_length(rec(64)) == 1.0
    assert 0 < mqar_report.density_at_length(rec(4)) < 0.5
    assert mqar_report.density_at_length(_rec("dense", acc=0.5, state=1)) is None  # no method config
