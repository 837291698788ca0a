"""Results you can trust (issue 22, items 1-5): no mixed rows, no stale reuse, failures that
name themselves, errors before compute, no orphaned workers or duplicated jobs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.records import load
from analysis.render import render
from runners import records
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
EXE = [sys.executable, "-m", "runners.cli"]
ENV = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}


def _cli(args, tmp_path, sweep="m", timeout=300, store="r.jsonl", **kw):
    flags = [a for a in args if a.startswith("-")]
    args = [a for a in args if not a.startswith("-")]
    return subprocess.run([*EXE, *flags, *TINY, f"store={tmp_path}/{store}", f"hydra.run.dir={tmp_path}/h",
                           f"hydra.sweep.dir={tmp_path}/{sweep}", *args], cwd=ROOT, capture_output=True,
                          text=True, env=ENV, timeout=timeout, **kw)


def _rec(method, T, status="ok", ms=1.0, run_id=None, time="2026-01-01T00:00:00", runner="kernel",
         task="fidelity", config=None, **kw):
    return {"run_id": run_id or f"{method}-{T}-{status}-{ms}", "time": time, "method": method,
            "impl": "sdpa", "real_kernel": True, "model": "attn_op", "task": task, "runner": runner,
            "seq_len": T, "batch_size": 1, "dtype": "float32", "device": "cpu", "causal": False,
            "status": status, "error": None if status == "ok" else "ValueError: num_landmarks must divide 96",
            "seed": 0, "method_params": {}, "env": {}, "details": {}, "config": config or {},
            "metrics": {"rel_err_random": 0.1} if status == "ok" else {},
            "latency_ms": {"forward": {"p20": ms, "p50": ms, "p80": ms}} if status == "ok" else {},
            "peak_mem_bytes": {}, "cost": None, **kw}


def _store(path, recs):
    for r in recs:
        records.append(path, r)
    return path


# --- item 3: failures that look like success ------------------------------------------------

def test_empty_store_renders_a_clear_message_not_a_key_error(tmp_path):
    from analysis import leaderboard

    empty = tmp_path / "r.jsonl"
    empty.write_text("")
    assert "no records" in render(load(empty))
    assert leaderboard.main(["--store", str(empty)]) == 1


def test_a_store_where_every_record_failed_shows_each_failure_with_its_reason(tmp_path):
    path = _store(tmp_path / "r.jsonl", [
        _rec("nystrom", 96, status="error"), _rec("dense", 96, status="oom"),
        _rec("dense", 0, status="error", runner="train", task="lra/listops")])
    text = render(load(path))
    assert "error: ValueError: num_landmarks must divide 96" in text  # the reason, not a blank
    assert "| oom" in text
    assert "### Failed runs (3)" in text
    lra = text.split("### Long Range Arena")[1].split("###")[0]
    assert "error: ValueError" in lra
    assert "### Not run" not in text


def test_runs_deliberately_not_run_are_listed_apart_from_the_failures(tmp_path):
    """A skipped record ("not run: <why>") is not a failure: it has its own section with its
    reason, and the failures section counts only the real failures."""
    path = _store(tmp_path / "r.jsonl", [
        _rec("nystrom", 96, status="error"),
        _rec("h2o", 0, status="skipped", runner="train", task="lra/listops",
             error="not run: forward is dense attention (a KV-cache press)")])
    text = render(load(path))
    assert "### Failed runs (1)" in text and "### Not run (1)" in text
    failed, not_run = text.split("### Failed runs (1)")[1].split("### Not run (1)")
    assert "nystrom" in failed and "h2o" not in failed
    assert "h2o" in not_run and "forward is dense attention" in not_run


def test_a_run_whose_records_all_failed_exits_non_zero(tmp_path):
    p = _cli(["method.impl=nope"], tmp_path)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "2 of 2 record(s) failed" in p.stdout + p.stderr
    assert {r["status"] for r in records.read(tmp_path / "r.jsonl")} == {"error"}


def test_a_sweep_with_failed_jobs_exits_non_zero_and_says_how_many(tmp_path):
    p = _cli(["-m", "method=dense,nystrom", "method.impl=reference,nope", "runner.seq_lens=[64]"], tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-2000:]
    assert "sweep: 2 of 4 job(s) failed" in out
    assert json.loads((tmp_path / "m/summary.json").read_text())["jobs_failed"] == 2


def test_a_job_that_crashes_before_its_record_is_counted_and_the_sweep_goes_on(tmp_path):
    p = _cli(["-m", "device=cpu,cuda:99", "runner.seq_lens=[64]"], tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-2000:]
    assert "sweep: 1 of 2 job(s) failed" in out
    s = json.loads((tmp_path / "m/summary.json").read_text())
    assert s["jobs"] == 2 and any("cuda:99" in e for e in s["errors"])
    assert [r["device"] for r in records.read(tmp_path / "r.jsonl") if r["status"] == "ok"] == ["cpu"]


# --- item 4: late errors ----------------------------------------------------------------------

def test_an_unwritable_store_is_refused_before_anything_is_measured(compose_cfg, tmp_path, monkeypatch):
    from runners import run
    from runners.kernel import KernelRunner

    measured = []
    monkeypatch.setattr(KernelRunner, "_check_and_measure", lambda self, *a, **k: measured.append(a))
    (tmp_path / "a_file").write_text("")
    cfg = compose_cfg(f"store={tmp_path}/a_file/r.jsonl")  # its parent is a file: never writable
    with pytest.raises(OSError, match="results store .*a_file/r.jsonl cannot be written"):
        run(cfg)
    assert measured == []


def test_an_unwritable_checkpoint_folder_is_refused_before_training(compose_cfg, tmp_path, monkeypatch):
    from runners import run, train

    monkeypatch.setattr(train, "_train", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "a_file").write_text("")
    cfg = compose_cfg("runner=train", "model=lra_encoder", "task=lra/listops", "runner.steps=1",
                      f"runner.checkpoint_dir={tmp_path}/a_file/ck", tiny=False)
    with pytest.raises(OSError, match="checkpoint folder .*a_file/ck cannot be written"):
        run(cfg)
    assert not Path(cfg.store).exists() or records.read(cfg.store) == []


def test_a_full_disk_is_refused_before_anything_is_measured(compose_cfg, monkeypatch):
    from collections import namedtuple

    from runners import run

    full = namedtuple("st", "f_bavail f_frsize")(0, 4096)
    monkeypatch.setattr(os, "statvfs", lambda p: full)
    with pytest.raises(OSError, match="full file system"):
        run(compose_cfg())


# --- item 2: stale reuse ------------------------------------------------------------------------

def _id(cfg, device="cpu", dtype="float32"):
    import torch

    return records.new(cfg, torch.device(device), getattr(torch, dtype), seq_len=64).run_id


def test_run_id_covers_the_resolved_device_and_dtype(compose_cfg):
    import torch

    cfg = compose_cfg("device=auto", "dtype=auto")  # the same config on a CPU and on a GPU
    assert _id(cfg, "cpu") != _id(cfg, "meta")
    assert _id(cfg, "cpu", "float32") != _id(cfg, "cpu", "float64")
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    on_gpu = records.identity(config, torch.device("cuda", 1), torch.bfloat16, {"gpu": "NVIDIA H200"})
    on_cpu = records.identity(config, torch.device("cpu"), torch.float32, {})
    assert records.run_id(config, identity=on_gpu) != records.run_id(config, identity=on_cpu)
    assert on_gpu["device"] == "cuda" and on_gpu["gpu"] == "NVIDIA H200"  # any cuda:N of one model


def test_run_id_covers_library_versions(compose_cfg, monkeypatch):
    from importlib import metadata

    cfg = compose_cfg()
    before = _id(cfg)
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda p: "99.0" if p == "transformers" else real(p))
    assert _id(cfg) != before


def test_run_id_covers_the_code_of_the_method_and_its_kernels(compose_cfg, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(ROOT / "methods", tmp_path / "methods")
    monkeypatch.setattr(records, "PROJECT_ROOT", tmp_path)
    cfg = compose_cfg("method=performer")
    before = _id(cfg)
    with open(tmp_path / "methods/linformer.py", "a") as f:  # another method's code: same id
        f.write("\n# unrelated change\n")
    assert _id(cfg) == before
    with open(tmp_path / "methods/kernels/linear_attn.py", "a") as f:  # the kernel it runs
        f.write("\nCHANGED = 1\n")
    assert _id(cfg) != before
    assert records.new(cfg, "cpu", "float32", seq_len=64).identity["code"] is not None


def test_run_id_covers_the_content_of_the_checkpoint_it_loads(compose_cfg, tmp_path):
    ck = tmp_path / "best.pt"
    ck.write_bytes(b"weights v1")
    cfg = compose_cfg("runner=evaluate", "model=lm", "task=needle", f"runner.checkpoint={ck}", tiny=False)
    before = _id(cfg)
    ck.write_bytes(b"weights v2")  # the same path, another model
    assert _id(cfg) != before
    assert records.new(cfg, "cpu", "float32").identity["inputs"] == {
        "runner.checkpoint": records.file_hash(ck)}


def _listops(store, ck, *extra):
    from hydra import compose, initialize_config_dir

    from methods import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "experiment=lra/listops-smoke", "runner.steps=2", "runner.eval_every=2", "runner.ckpt_every=1",
            f"runner.checkpoint_dir={ck}", f"store={store}", *extra])


def test_force_on_a_training_run_trains_again_instead_of_resuming(tmp_path):
    from runners import run

    store = tmp_path / "r.jsonl"
    first = run(_listops(store, tmp_path / "ck"))[0]
    assert first.status == "ok" and "resumed_from_step" not in first.details
    assert run(_listops(store, tmp_path / "ck")) == []  # done: skipped
    again = run(_listops(store, tmp_path / "ck", "runner.force=true"))[0]
    assert again.status == "ok" and "resumed_from_step" not in again.details  # started over
    assert again.train["steps"] == 2 and len(again.train["loss_curve"]) == 2
    assert again.run_id == first.run_id and len(records.read(store)) == 2


# --- item 1: mixed runs in one row -------------------------------------------------------------

FULL = {"runner": {"repeats": 5, "warmup": 2}, "task": {"max_len": 4096}, "model": {"batch_size": 1}}
SMOKE = {"runner": {"repeats": 2, "warmup": 1}, "task": {"max_len": 4096}, "model": {"batch_size": 4}}


def test_a_smoke_run_in_the_same_store_does_not_change_the_full_runs_speedup(tmp_path):
    later = "2026-02-01T00:00:00"
    path = _store(tmp_path / "r.jsonl", [
        _rec("dense", 4096, ms=10.0, config=FULL), _rec("nsa", 4096, ms=232.0, config=FULL),
        _rec("dense", 4096, ms=65.0, config=SMOKE, time=later)])  # a smoke run's dense, newer
    text = render(load(path))
    full = text.split("[model.batch_size=1")[1].split("###")[0]
    assert "| 0.04x" in full and "0.28x" not in text  # 10 / 232, never 65 / 232
    assert "10.000" in full and "65.000" not in full
    smoke = text.split("[model.batch_size=4")[1].split("###")[0]
    assert "65.000" in smoke and "nsa" not in smoke
    from analysis.tables import kernel_table

    t = kernel_table(load(path))  # one table over both: the setting splits the rows
    assert sorted(t["method"]) == ["dense [model.batch_size=1 runner.repeats=5 runner.warmup=2]",
                                   "dense [model.batch_size=4 runner.repeats=2 runner.warmup=1]",
                                   "nsa [model.batch_size=1 runner.repeats=5 runner.warmup=2]"]


def test_the_lra_table_never_puts_a_smoke_accuracy_in_a_full_runs_cell(tmp_path):
    from analysis.tables import lra_table

    full, smoke = {"runner": {"steps": 5000, "batch_size": 32}}, {"runner": {"steps": 20, "batch_size": 16}}
    lra = dict(runner="train", task="lra/listops")
    path = _store(tmp_path / "r.jsonl", [
        _rec("dense", 2000, config=full, metrics={"test_acc": 0.625}, **lra),
        _rec("dense", 48, config=smoke, metrics={"test_acc": 0.1406}, time="2026-02-01T00:00:00", **lra),
        _rec("dense", 4000, config={"runner": {"steps": 5000}}, task="lra/text", runner="train",
             metrics={"test_acc": 0.6})])
    t = lra_table(load(path)).set_index("method")
    assert t.loc["dense [runner.steps=5000 runner.batch_size=32]", "listops"] == "62.50"
    assert t.loc["dense [runner.steps=20 runner.batch_size=16]", "listops"] == "14.06"
    assert t.loc["dense", "text"] == "60.00"  # one setting of text: no label


def test_the_lra_table_averages_the_seeds_and_shows_a_failed_seed(tmp_path):
    """Three seeds of one method and task: their mean and the 95% bootstrap half-width (each
    seed's newest record), not the newest seed alone; a failed seed shows as the failure."""
    from analysis.tables import lra_table

    lra = dict(runner="train", task="lra/listops", config={"runner": {"steps": 300}})
    recs = [_rec("dense", 2000, run_id=f"d{s}", metrics={"test_acc": a}, time=f"2026-01-01T00:00:0{s}", **lra)
            for s, a in ((0, 0.30), (1, 0.34), (2, 0.38))]
    recs.append(_rec("dense", 2000, run_id="d2-old", metrics={"test_acc": 0.99}, time="2025-01-01T00:00:00", **lra))
    recs += [_rec("linformer", 2000, run_id=f"l{s}", metrics={"test_acc": 0.5}, time=f"2026-01-01T00:00:0{s}", **lra)
             for s in (0, 1)]
    recs.append(_rec("linformer", 2000, status="error", run_id="l2", time="2026-01-01T00:00:05", **lra))
    for r, seed in zip(recs, (0, 1, 2, 2, 0, 1, 2)):
        r["seed"] = seed
    t = lra_table(load(_store(tmp_path / "r.jsonl", recs))).set_index("method")
    mean, half = t.loc["dense", "listops"].split(" ± ")
    assert float(mean) == pytest.approx(34.0) and 0 < float(half) <= 4.0
    assert t.loc["dense", "seeds"] == "0,1,2" and float(t.loc["dense", "avg"]) == pytest.approx(34.0)
    assert "error" in t.loc["linformer", "listops"] and t.loc["linformer", "avg"] == "-"
    recs.append(_rec("dense", 4000, run_id="t0", metrics={"test_acc": 0.6}, task="lra/text", runner="train"))
    t = lra_table(load(_store(tmp_path / "r2.jsonl", recs))).set_index("method")
    assert float(t.loc["dense", "avg"]) == pytest.approx(47.0)  # (34 + 60) / 2
    recs.append(_rec("performer", 4000, run_id="p0", metrics={"test_acc": 0.7}, task="lra/text", runner="train"))
    t = lra_table(load(_store(tmp_path / "r3.jsonl", recs))).set_index("method")
    assert t.loc["performer", "avg"] == "-"  # text only: not comparable with dense's two tasks


def test_reproduce_refuses_records_of_several_settings(tmp_path):
    from analysis.reproduce import table

    _store(tmp_path / "r.jsonl", [
        _rec("nsa", 4096, config=FULL, metrics={"rel_err_random": 0.1}),
        _rec("nsa", 4096, ms=3.0, config=SMOKE, metrics={"rel_err_random": 0.9}, time="2026-02-01T00:00:00")])
    entry = {"id": "x", "metric": "err", "value": 0.1, "tolerance": 0.05, "source": "paper",
             "ours": {"store": "r.jsonl", "method": "nsa", "seq_len": 4096, "metric": "rel_err_random"}}
    row = table([entry], root=tmp_path).iloc[0]
    assert row["ours"].startswith("refused: records of several settings match")
    assert row["within"] == "-"


def test_reproduce_compares_the_mean_over_seeds(tmp_path):
    """Seeds of one setting: the published number is compared with their mean (each seed's
    newest record), not with whichever seed ran last."""
    from analysis.reproduce import table

    recs = [_rec("nsa", 4096, run_id=f"s{s}", config=FULL, metrics={"rel_err_random": e},
                 time=f"2026-01-01T00:00:0{s}") for s, e in ((0, 0.1), (1, 0.3))]
    recs.append(_rec("nsa", 4096, run_id="s1-old", config=FULL, metrics={"rel_err_random": 0.9},
                     time="2025-01-01T00:00:00"))
    for r, seed in zip(recs, (0, 1, 1)):
        r["seed"] = seed
    _store(tmp_path / "r.jsonl", recs)
    entry = {"id": "x", "metric": "err", "value": 0.2, "tolerance": 0.05, "source": "paper",
             "ours": {"store": "r.jsonl", "method": "nsa", "seq_len": 4096, "metric": "rel_err_random"}}
    row = table([entry], root=tmp_path).iloc[0]
    assert row["ours"] == "0.20" and row["within"] == "yes"


# --- item 5: orphans and collisions -------------------------------------------------------------

def test_a_claim_is_exclusive_and_ends_with_its_holder(tmp_path):
    import signal
    import time

    store = tmp_path / "r.jsonl"
    with records.claim(store, "abc") as a:
        with records.claim(store, "abc") as b, records.claim(store, "other") as c:
            assert a and not b and c
    with records.claim(store, "abc") as again:
        assert again  # released at the end of the block
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from runners import records
with records.claim({str(store)!r}, "abc") as mine:
    print(mine, flush=True)
    time.sleep(60)
"""], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"
    with records.claim(store, "abc") as mine:
        assert not mine  # held by a live process
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    with records.claim(store, "abc") as mine:
        assert mine  # a killed holder's claim is gone with it


SWEEP = ["-m", "method=dense,performer,nystrom,sliding_window", "runner.seq_lens=[64,80,96,112,128]"]


def _popen(args, tmp_path, sweep, store="r.jsonl"):
    flags = [a for a in args if a.startswith("-")]
    rest = [a for a in args if not a.startswith("-")]
    return subprocess.Popen([*EXE, *flags, *TINY, f"store={tmp_path}/{store}", f"hydra.sweep.dir={tmp_path}/{sweep}",
                             *rest], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_sweeps_at_once_on_one_store_run_each_job_once(tmp_path):
    a, b = _popen(SWEEP, tmp_path, "m1"), _popen(SWEEP, tmp_path, "m2")
    outs = [p.communicate(timeout=600)[0] for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    recs = records.read(tmp_path / "r.jsonl")
    ids = [r["run_id"] for r in recs]
    assert len(ids) == len(set(ids)) == 20, "every job once, none twice"
    assert all(r["status"] == "ok" for r in recs)
    assert len({r["env"]["pid"] for r in recs}) == 2, "both sweeps did part of the work"


def test_two_sweeps_never_share_an_output_folder(tmp_path):
    import time

    first = _popen(SWEEP, tmp_path, "m")
    deadline = time.time() + 120
    while not (tmp_path / "m/.sweep.lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = _cli(["-m", "method=dense"], tmp_path, store="r2.jsonl")  # the same hydra.sweep.dir
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, out[-2000:]
    assert second.returncode == 1 and "is in use by another sweep" in second.stdout + second.stderr
    assert not (tmp_path / "r2.jsonl").exists() or records.read(tmp_path / "r2.jsonl") == []
    # and the default folder is unique per sweep: a timestamp to the microsecond (composed in
    # process, as each sweep's process composes it when it starts)
    from hydra import compose, initialize_config_dir

    from methods import CONF_DIR

    dirs = []
    for _ in range(2):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            dirs.append(compose(config_name="config", return_hydra_config=True).hydra.sweep.dir)
    assert dirs[0] != dirs[1] and all(d.startswith("results/local/multirun/") for d in dirs)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_workers_stop_when_the_sweep_process_is_killed(tmp_path):
    import signal
    import time

    store = tmp_path / "r.jsonl"
    p = _popen(["-m", "hydra/launcher=local", "method=dense,performer,nystrom,sliding_window",
                "runner.seq_lens=[64,80,96,112,128,144,160,176,192,208,224,240]", "runner.repeats=20"],
               tmp_path, "m")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if store.exists() and len(records.read(store)) >= 2:
            break
        time.sleep(0.05)
    assert p.poll() is None, p.stdout.read()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()
    workers = {r["env"]["pid"] for r in records.read(store)}
    time.sleep(3)
    assert not [w for w in workers if _alive(w)], "no worker outlives the sweep"
    n = len(store.read_text().splitlines())
    time.sleep(2)
    assert len(store.read_text().splitlines()) == n, "nothing appended after the sweep died"
    assert len(records.read(store)) == n  # every line whole


# --- issue 28, item 5: where and how a record was measured ---------------------------------------

def test_environment_names_versions_and_on_a_gpu_its_driver_and_clocks(tmp_path, monkeypatch):
    env = records.environment("cpu")
    for key in ("torch", "cuda", "triton", "transformers", "gpu", "gpu_driver", "gpu_clocks"):
        assert key in env, key
    assert env["transformers"] == records.version("transformers") and env["gpu"] is None
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho \"$@\" > %s/args\necho '550.54.15, 1980, 2619, 1980, 2619, 34, 118.20, P0'\n"
                    % tmp_path)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    got = records.gpu_clocks(1)
    assert got["gpu_driver"] == "550.54.15"
    assert got["gpu_clocks"]["clocks.sm"] == "1980" and got["gpu_clocks"]["clocks.max.mem"] == "2619"
    assert "--id=5" in (tmp_path / "args").read_text()  # the physical GPU of visible index 1
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert records.gpu_clocks(0) == {"gpu_driver": None, "gpu_clocks": None}


def test_timings_carry_their_counts_and_min_median_max(compose_cfg):
    from runners import run

    rec = run(compose_cfg("runner.seq_lens=[64]", "runner.warmup=1", "runner.repeats=3"))[0]
    fwd = rec.latency_ms["forward"]
    assert fwd["warmup"] == 1 and fwd["repeats"] == 3
    assert fwd["min"] <= fwd["p20"] <= fwd["median"] <= fwd["p80"] <= fwd["max"]
    assert fwd["median"] == fwd["p50"]


def test_a_corrupt_truncated_or_crafted_checkpoint_is_refused_naming_the_file(tmp_path):
    import pickle

    import torch

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": torch.zeros(64)}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02" + os.urandom(512))
    (tmp_path / "crafted.pt").write_bytes(pickle.dumps({"model": Payload()}, protocol=2))
    for name in ("truncated", "corrupt", "crafted"):
        with pytest.raises(ValueError, match=f"checkpoint .*{name}.pt cannot be loaded"):
            records.load_checkpoint(tmp_path / f"{name}.pt")
    assert not marker.exists()
    assert torch.equal(records.load_checkpoint(tmp_path / "whole.pt")["x"], torch.zeros(64))
