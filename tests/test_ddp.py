"""Distributed training (torchrun, DDP) with the gloo backend on the CPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runners.records import read

ROOT = Path(__file__).resolve().parent.parent


def _train(tmp_path, name, nproc):
    env = {**os.environ, "TQDM_DISABLE": "1", "ATTNBENCH_DATA": str(tmp_path / "data"),
           "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    p = subprocess.run([*launcher, "-m", "runners.cli", "experiment=lra/listops-smoke", "model.dropout=0",
                        "runner.steps=12", "runner.batch_size=16", "runner.cpu_threads=1",
                        f"runner.checkpoint_dir={tmp_path}/ck-{name}", f"store={tmp_path}/{name}.jsonl",
                        f"hydra.run.dir={tmp_path}/h-{name}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = read(tmp_path / f"{name}.jsonl")
    assert len(recs) == 1, "only rank 0 writes the record"
    return recs[0]


def test_ddp_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    one = _train(tmp_path, "one", 1)
    two = _train(tmp_path, "two", 2)
    assert two["details"]["world_size"] == 2 and one["status"] == two["status"] == "ok"
    assert two["train"]["tokens"] == one["train"]["tokens"]
    assert two["train"]["loss_curve"] == pytest.approx(one["train"]["loss_curve"], rel=1e-4, abs=1e-5)
    assert two["metrics"]["test_acc"] == pytest.approx(one["metrics"]["test_acc"], abs=1 / 64)
    from analysis.multi_gpu import ddp_report

    table, ok = ddp_report(tmp_path / "one.jsonl", tmp_path / "two.jsonl", tol=1e-4)
    assert ok and "| processes | 1 | 2 |" in table
