"""Long Range Arena: ListOps generator, encoder training with every method, resume."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from runners import run
from runners.records import read
from tasks.lra import listops

ROOT = Path(__file__).resolve().parent.parent


def stack_eval(seq):
    """An evaluator independent of the generator's: a stack machine over the tokens."""
    stack = []
    for t in seq:
        if t.startswith("["):
            stack.append([t])
        elif t == "]":
            op, *args = stack.pop()
            v = {"[MIN": min, "[MAX": max, "[SM": lambda a: sum(a) % 10,
                 "[MED": lambda a: int(torch.tensor(a, dtype=torch.float64).median() if len(a) % 2
                                       else sum(sorted(a)[len(a) // 2 - 1:len(a) // 2 + 1]) // 2)}[op](args)
            if stack:
                stack[-1].append(v)
            else:
                return v
        else:
            stack[-1].append(int(t)) if stack else stack.append(int(t))
    return stack[0] if len(stack) == 1 and isinstance(stack[0], int) else None


def test_listops_generator_is_deterministic_and_matches_the_spec():
    a = listops.generate(150, seed=3)
    assert a == listops.generate(150, seed=3)
    assert a != listops.generate(150, seed=4)
    for seq, label in a:
        assert 500 < len(seq) < 2000
        assert set(seq) <= set(listops.VOCAB)
        assert stack_eval(seq) == label
        assert seq[0] in listops.OPERATORS and seq[-1] == listops.END
    labels = Counter(label for _, label in a)
    assert len(labels) == 10 and max(labels.values()) / len(a) < 0.3


def test_depth_and_argument_limits():
    def depth_args(seq):
        d = m = 0
        for t in seq:
            d += t.startswith("[")
            m = max(m, d)
            d -= t == "]"
        return m

    for seq, label in listops.generate(200, seed=5, min_length=4, max_length=60, max_depth=3, max_args=4):
        assert depth_args(seq) <= 3 and stack_eval(seq) == label


def test_median_is_lra_integer_median():
    assert listops.evaluate((listops.MED, [1, 2, 3, 9])) == 2  # int(np.median) = int(2.5)
    assert listops.evaluate((listops.MED, [4, 1, 7])) == 4


def test_listops_data_is_cached_on_disk(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))
    cfg = compose_cfg("experiment=lra/listops-smoke", tiny=False)
    first = listops.load(cfg.task)
    monkeypatch.setattr(listops, "generate", lambda *a, **k: pytest.fail("regenerated"))
    second = listops.load(cfg.task)
    assert torch.equal(first["train"][0], second["train"][0])
    assert first["train"][0].shape == (256, 48) and first["num_classes"] == 10


@pytest.fixture
def lra_cfg(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))

    def _cfg(*overrides):
        return compose_cfg("experiment=lra/listops-smoke", f"runner.checkpoint_dir={tmp_path}/ck",
                           f"store={tmp_path}/lra.jsonl", *overrides, tiny=False)

    return _cfg


def test_smoke_trains_with_one_method_of_each_family(lra_cfg, representative):
    """The LRA runner end to end (padded batches, validation, test accuracy); training with
    every method in every setting it supports is test_layers.py's."""
    rec = run(lra_cfg(f"method={representative}", "runner.steps=6", "runner.eval_every=3"))[0]
    assert rec.status == "ok", rec.error
    assert rec.train["steps"] == 6 and rec.train["tokens"] == 6 * 16 * 48
    assert 0 <= rec.metrics["test_acc"] <= 1
    assert all(torch.isfinite(torch.tensor(rec.train["loss_curve"])))


def test_listops_easy_setting_learns_well_above_chance(lra_cfg):
    rec = run(lra_cfg("runner.steps=300", "task.num_train=2000", "runner.eval_every=100",
                      "runner.ckpt_every=100"))[0]
    assert rec.status == "ok"
    assert rec.metrics["test_acc"] > 0.4, rec.metrics  # chance is about 0.1


def test_training_is_deterministic_on_cpu(lra_cfg, tmp_path):
    a = run(lra_cfg("runner.steps=8", "runner.force=true", "runner.resume=false"))[0]
    b = run(lra_cfg("runner.steps=8", "runner.force=true", "runner.resume=false"))[0]
    assert a.train["loss_curve"] == b.train["loss_curve"]


def test_resume_after_a_kill_continues_from_the_last_checkpoint(tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1", "ATTNBENCH_DATA": str(tmp_path / "data")}
    args = [sys.executable, "-m", "runners.cli", "experiment=lra/listops-smoke", "runner.steps=60",
            "runner.ckpt_every=5", "runner.eval_every=30", f"runner.checkpoint_dir={tmp_path}/ck",
            f"hydra.run.dir={tmp_path}/h"]
    ref = subprocess.run([*args, f"store={tmp_path}/ref.jsonl", f"runner.checkpoint_dir={tmp_path}/ck_ref"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    p = subprocess.Popen([*args, f"store={tmp_path}/r.jsonl"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ck = None
    while time.time() < deadline and p.poll() is None:
        found = list((tmp_path / "ck").glob("*/last.pt"))
        if found:
            state = torch.load(found[0], weights_only=True)["state"]
            if 10 <= state["step"] < 60:
                ck = state["step"]
                break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ck is not None, "no checkpoint mid-run (the run was too fast or failed)"
    assert read(tmp_path / "r.jsonl") == []  # the killed run wrote no record
    again = subprocess.run([*args, f"store={tmp_path}/r.jsonl"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rec = read(tmp_path / "r.jsonl")[0]
    assert rec["status"] == "ok" and rec["details"]["resumed_from_step"] >= ck
    want = read(tmp_path / "ref.jsonl")[0]
    assert rec["train"]["steps"] == 60
    assert json.dumps(rec["train"]["loss_curve"]) == json.dumps(want["train"]["loss_curve"])
    assert rec["metrics"]["test_acc"] == want["metrics"]["test_acc"]


def test_listops_data_does_not_depend_on_the_worker_count():
    kw = dict(min_length=4, max_length=60, max_depth=3, max_args=4)
    from tasks.lra.listops import SHARD

    n = SHARD + 7  # two shards
    assert listops.generate(n, seed=3, workers=1, **kw) == listops.generate(n, seed=3, workers=2, **kw)
