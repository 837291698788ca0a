"""The attnbench command (Hydra app): single runs, multiruns, errors, the leaderboard."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runners.records import read
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
EXE = [sys.executable, "-m", "runners.cli"]


def _run(args, tmp_path, env_extra=None):
    env = {**os.environ, "TQDM_DISABLE": "1", **(env_extra or {})}
    flags = [a for a in args if a.startswith("-")]
    args = [a for a in args if not a.startswith("-")]
    return subprocess.run([*EXE, *flags, *TINY, f"store={tmp_path}/r.jsonl",
                           f"hydra.run.dir={tmp_path}/h", f"hydra.sweep.dir={tmp_path}/m", *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_multirun_impl_sweep_then_the_leaderboard_command_on_its_store(tmp_path):
    """One sweep (without a logger) feeds the leaderboard command: no subprocess sweep twice."""
    p = _run(["-m", "method=dense", "impl=reference,sdpa"], tmp_path)
    assert p.returncode == 0, p.stderr
    recs = read(tmp_path / "r.jsonl")
    assert sorted((r["impl"], r["seq_len"]) for r in recs) == [
        ("reference", 64), ("reference", 96), ("sdpa", 64), ("sdpa", 96)]
    assert all(r["status"] == "ok" for r in recs)
    assert not (tmp_path / "wandb").exists()  # logger=none (the default): nothing is tracked

    out = tmp_path / "lb.md"
    p = subprocess.run([sys.executable, "-m", "analysis.leaderboard", "--store",
                        str(tmp_path / "r.jsonl"), "--out", str(out), "--plot",
                        str(tmp_path / "lat.png")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert "| dense    | reference" in text and "| dense    | sdpa" in text
    assert (tmp_path / "lat.png").stat().st_size > 1000


def test_unknown_method_on_the_command_line(tmp_path):
    p = _run(["method=nope"], tmp_path)
    assert p.returncode != 0
    assert "nope" in p.stderr and "dense" in p.stderr  # Hydra lists the available options


def test_leaderboard_without_store_says_so(tmp_path, capsys):
    from analysis import leaderboard

    assert leaderboard.main(["--store", str(tmp_path / "none.jsonl")]) == 1
    assert "no results store" in capsys.readouterr().err


def test_every_experiment_composes_and_runs_on_cpu(compose_cfg, store, tmp_path, monkeypatch):
    """Every experiment composes and has its run command on top; the kernel suites run at CPU
    size, and every LRA experiment has a smoke variant (run here, or with its fixture data in
    test_lra_hub.py for the tasks whose data is loaded)."""
    from runners import run
    from runners.records import read as read_store

    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))
    exps = sorted(p.relative_to(ROOT / "conf/experiment").with_suffix("").as_posix()
                  for p in (ROOT / "conf/experiment").rglob("*.yaml"))
    lra = {"listops", "text", "retrieval", "image", "pathfinder", "pathx"}
    assert {"default", "efficiency/causal", "efficiency/noncausal", "efficiency/smoke"} <= set(exps)
    assert {f"lra/{t}" for t in lra} | {f"lra/{t}-smoke" for t in lra} <= set(exps)
    kernel_small = ["model.num_heads=2", "model.num_kv_heads=2", "model.head_dim=16",
                    "runner.seq_lens=[64]", "task.max_len=64"]
    ran = 0
    for e in exps:
        first = (ROOT / "conf/experiment" / f"{e}.yaml").read_text().splitlines()
        assert any(line.startswith("# attnbench") for line in first[:3]), f"{e}: run command on top"
        cfg = compose_cfg(f"experiment={e}", tiny=False)
        if cfg.runner._target_ == "runners.kernel.KernelRunner":
            cfg = compose_cfg(f"experiment={e}", "device=cpu", "dtype=float32", *kernel_small,
                              "runner.force=true", f"store={store}", tiny=False)
        elif e in ("lra/listops-smoke", "lra/pathfinder-smoke", "lra/pathx-smoke"):
            cfg = compose_cfg(f"experiment={e}", "runner.steps=2", f"runner.checkpoint_dir={tmp_path}/ck",
                              "runner.force=true", f"store={store}", tiny=False)
        else:
            continue
        assert run(cfg)[0].status == "ok", e
        ran += 1
    assert len(read_store(store)) == ran


def test_parallel_jobs_append_to_one_store(tmp_path):
    """Four jobs in two worker processes at once: every record arrives whole, none twice."""
    p = _run(["-m", "hydra/launcher=local", "method=dense,performer,nystrom,sliding_window",
              "runner.seq_lens=[64,96,128]"], tmp_path)
    assert p.returncode == 0, p.stderr
    recs = read(tmp_path / "r.jsonl")
    assert sorted((r["method"], r["seq_len"]) for r in recs) == sorted(
        (m, t) for m in ("dense", "performer", "nystrom", "sliding_window") for t in (64, 96, 128))
    assert len({r["run_id"] for r in recs}) == 12
    assert len({r["env"].get("pid") for r in recs}) >= 2, "the jobs ran in separate processes"


def test_oom_in_one_of_six_parallel_jobs_is_recorded_and_summarised(tmp_path):
    """A real out-of-memory error (a 32 GiB allocation on a 24 GiB machine) in one job."""
    lens = "[64],[72],[80],[88],[96],[268435456]"
    p = _run(["-m", "hydra/launcher=local", f"runner.seq_lens={lens}"], tmp_path)
    assert p.returncode == 1, p.stderr  # a sweep with a failed job is not a success
    assert "sweep: 1 of 6 job(s) failed" in p.stderr + p.stdout
    recs = read(tmp_path / "r.jsonl")
    assert sorted(r["status"] for r in recs) == ["ok"] * 5 + ["oom"]
    oom = next(r for r in recs if r["status"] == "oom")
    assert oom["seq_len"] == 268435456 and "allocate" in oom["error"]
    assert "sweep summary: 6 jobs; records: 5 ok, 1 oom" in p.stderr + p.stdout
    assert (tmp_path / "leaderboard.md").exists()


def test_multirun_killed_part_way_and_run_again_completes_only_the_missing_jobs(tmp_path):
    import signal
    import time

    args = ["-m", "method=dense,performer,nystrom,sliding_window", "runner.seq_lens=[64,512]"]
    flags = [a for a in args if a.startswith("-")]
    rest = [a for a in args if not a.startswith("-")]
    store = tmp_path / "r.jsonl"
    p = subprocess.Popen([*EXE, *flags, *TINY, *rest, f"store={store}", f"hydra.sweep.dir={tmp_path}/m1"],
                         cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if store.exists() and len(store.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = read(store)
    assert 3 <= len(before) < 8, "killed part-way"
    again = _run(args, tmp_path)
    assert again.returncode == 0, again.stderr
    after = read(store)
    assert len(after) == 8 and len({r["run_id"] for r in after}) == 8  # all there, none twice
    assert {r["run_id"] for r in before} <= {r["run_id"] for r in after}
    assert "job(s) skipped" in again.stderr + again.stdout


def test_gpu_pool_gives_each_job_its_own_device_in_a_fresh_process(tmp_path):
    """On the CPU the pool hands out device ids [0, 1] as it would GPUs."""

    p = _run(["-m", "hydra/launcher=gpu_pool", "hydra.launcher.gpus=[0,1]",
              "method=dense,performer,nystrom,sliding_window", "runner.seq_lens=[64]"], tmp_path)
    assert p.returncode == 0, p.stderr
    from analysis.multi_gpu import jobs, max_concurrency, overlaps, sweep_report

    js = jobs(tmp_path / "m")
    assert len(js) == 4 and all(j["statuses"] == ["ok"] for j in js)
    assert len({j["pid"] for j in js}) == 4, "a fresh process per job"
    assert {j["cuda_visible_devices"] for j in js} <= {"0", "1"}
    assert max_concurrency(js) <= 2, "at most two jobs at a time"
    dev = {j["job"]: j["cuda_visible_devices"] for j in js}
    for a, others in overlaps(js).items():
        assert all(dev[b] != dev[a] for b in others), "overlapping jobs on different devices"
    recs = read(tmp_path / "r.jsonl")
    assert {r["env"]["cuda_visible_devices"] for r in recs} <= {"0", "1"}
    table, alone = sweep_report(tmp_path / "m", tmp_path / "r.jsonl")
    assert table.count("\n| ") == 4 and not alone, "no GPU here: the records name none, so not shown alone"


def test_two_job_sweep_through_submitit_local(tmp_path):
    p = _run(["-m", "hydra/launcher=cluster_local", "method=dense,performer", "runner.seq_lens=[64]"],
             tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = read(tmp_path / "r.jsonl")
    assert sorted(r["method"] for r in recs) == ["dense", "performer"]
    assert all(r["status"] == "ok" for r in recs)


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from methods import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=cluster", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    text = OmegaConf.to_yaml(cfg.hydra.launcher)
    for key in ("partition: gpu", "gpus_per_node: 1", "array_parallelism: 64", "timeout_min: 120",
                "SlurmLauncher"):
        assert key in text


def test_wandb_logger_offline_leaves_a_run_directory_with_the_metrics(tmp_path):
    import json

    pytest.importorskip("wandb")
    env_extra = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    p = _run(["logger=wandb", f"logger.dir={tmp_path}"], tmp_path, env_extra)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()  # history records: keys and JSON values as plain protobuf strings
    for key in (b"metrics/rel_err_random", b"latency_ms/forward/p50", b"cost/flops", b"records"):
        assert key in data
    rec = read(tmp_path / "r.jsonl")[0]
    assert json.dumps(rec["metrics"]["rel_err_random"]).encode() in data


def test_efficiency_script_commands_compose_and_build(compose_cfg):
    """Every ``run -m`` line of scripts/efficiency.sh, its sweeps expanded: the overrides compose
    and each method builds at the line's shape (a renamed key or value fails here, not on the GPU)."""
    import itertools
    import shlex

    import methods
    from runners import with_impl

    text = (ROOT / "scripts/efficiency.sh").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("run -m ")]
    assert len(lines) >= 10
    built = 0
    for line in lines:
        args = [a for a in shlex.split(line)[2:] if a != "$@"]
        sweeps = [[f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")]
                  if "," in a and not a.split("=", 1)[1].startswith("[") else [a] for a in args]
        for combo in itertools.product(*sweeps):
            cfg = with_impl(compose_cfg(*combo, tiny=False))
            m = cfg.model
            method = methods.build(cfg.method, num_heads=m.num_heads, head_dim=m.head_dim,
                                   num_kv_heads=m.num_kv_heads, max_seq_len=max(cfg.runner.seq_lens))
            assert method.impl == cfg.method.impl, (line, combo)
            built += 1
    assert built >= 40
