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
from hydra.utils import instantiate

from runners import run
from runners.records import read
from tasks.lra import image, listops

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


def test_skip_dense_forward_records_a_press_as_not_run_and_trains_the_rest(lra_cfg, monkeypatch):
    """runner.skip_dense_forward: a KV-cache press and a decode-time selector (forward = dense
    attention) record "not run: forward is dense attention" before any data is built; a method
    with its own forward (Eigen Attention, a press that attends with its reduced keys) trains."""
    from analysis.records import load
    from analysis.render import lra_notes
    from analysis.tables import lra_table
    from tasks.lra.listops import ListOps

    def no_data(self):
        raise AssertionError("data built for a skipped run")

    for m, why in (("h2o", "KV-cache press"), ("quest", "decode-time selector")):
        with monkeypatch.context() as mp:
            mp.setattr(ListOps, "load", no_data)
            rec = run(lra_cfg(f"method={m}", "runner.skip_dense_forward=true", "runner.steps=2",
                              "runner.eval_every=2"))[0]
        assert rec.status == "skipped" and rec.error.startswith("not run: forward is dense attention (") \
            and why in rec.error, rec.error
    rec = run(lra_cfg("method=eigen_attention", "runner.skip_dense_forward=true", "runner.steps=2",
                      "runner.eval_every=2"))[0]
    assert rec.status == "ok", rec.error
    table = lra_table(load(rec.config["store"])).set_index("method")
    assert table.loc["h2o", "listops"] == "not run: forward is dense attention"
    notes = lra_notes(load(rec.config["store"]))
    assert "forward is dense attention" in notes and "data absent" not in notes


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


# ---- LRA Image on Fashion-MNIST (idx files), and data that is absent ---------------------------
def _idx(arr, code=0x08):
    """An idx file's bytes written by hand: 0, 0, type code, ndim, big-endian uint32 dims, data."""
    import struct

    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", n) for n in arr.shape)
    return head + arr.astype({0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]).tobytes()


def _fashion_folder(folder, n_train=40, n_test=10, seed=0):
    """Four gzip-compressed idx files as the Debian package ships them, random 28 x 28 images."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, (fi, fl) in (("train", n_train, image.FILES["train"]), ("test", n_test, image.FILES["test"])):
        imgs = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        imgs[:, 0, 0] = 0  # a black pixel: token 1, not padding
        labels = (np.arange(n) % 10).astype(np.uint8)
        (folder / fi).write_bytes(gzip.compress(_idx(imgs)))
        (folder / fl).write_bytes(gzip.compress(_idx(labels)))
        out[split] = (imgs, labels)
    return out


def test_idx_reader_reads_hand_built_image_files(tmp_path):
    import gzip

    import numpy as np

    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx(a))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(a)))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        got = image.read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4) and (got == a).all()
    s = np.array([[-3, 300], [7, -32768]], dtype=np.int16)  # big-endian int16 (type 0x0B)
    (tmp_path / "s").write_bytes(_idx(s, 0x0B))
    assert (image.read_idx(tmp_path / "s") == s).all()
    bad = {"magic": b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc",
           "type code": b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc",
           "header": b"\x00\x00\x08\x03" + (3).to_bytes(4, "big"),
           "needs 6": b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"abc"}
    for match, raw in bad.items():
        (tmp_path / "bad").write_bytes(raw)
        with pytest.raises(ValueError, match=match):
            image.read_idx(tmp_path / "bad")


def test_image_task_reads_fashion_mnist_as_784_pixel_tokens(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "assets"))
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))
    raw = _fashion_folder(tmp_path / "assets" / image.FASHION)
    cfg = compose_cfg("experiment=lra/image-smoke", "task.max_len=784", tiny=False)
    assert cfg.task.source == "fashion_mnist" and not cfg.task.data_files
    data = instantiate(cfg.task).load()
    (x, y), (xv, yv), (xt, yt) = data["train"], data["val"], data["test"]
    assert x.shape == (32, 784) and xv.shape == (8, 784) and xt.shape == (10, 784)
    assert data["vocab_size"] == 257 and data["num_classes"] == 10 and data["pad_id"] == 0
    imgs, labels = raw["test"]
    assert xt.tolist() == (imgs.reshape(10, -1).astype(int) + 1).tolist() and yt.tolist() == labels.tolist()
    # train + val are the training images with their labels, each once, pixels + 1 in row-major order
    seen = sorted(zip(map(tuple, torch.cat([x, xv]).tolist()), torch.cat([y, yv]).tolist()))
    imgs, labels = raw["train"]
    assert seen == sorted(zip(map(tuple, (imgs.reshape(40, -1).astype(int) + 1).tolist()), labels.tolist()))
    assert int(x.min()) == 1  # black pixels are tokens, not padding


def test_image_smoke_trains_on_fashion_mnist(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "assets"))
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))
    _fashion_folder(tmp_path / "assets" / image.FASHION)
    cfg = compose_cfg("experiment=lra/image-smoke", "task.max_len=784", "method=ponet",
                      f"runner.checkpoint_dir={tmp_path}/ck", f"store={tmp_path}/r.jsonl", tiny=False)
    rec = run(cfg)[0]
    assert rec.status == "ok", rec.error
    assert rec.train["tokens"] == 6 * 8 * 784 and torch.isfinite(torch.tensor(rec.train["loss_curve"])).all()


@pytest.mark.parametrize("task,overrides,why", [
    ("image", ["task.max_len=784"], "fetch_assets.py --fashion-mnist"),
    ("retrieval", [], "new_aan_pairs"),
    ("text", ["++task.data_files.train=/nonexistent/train.csv", "++task.data_files.test=/nonexistent/test.csv"],
     "/nonexistent/train.csv"),
])
def test_absent_data_is_recorded_as_not_run(task, overrides, why, compose_cfg, tmp_path, monkeypatch):
    """Image without the fetched asset, Retrieval without files, Text with missing files: the
    record says "not run: data absent" (status skipped, not an error of the method) with the
    reason, and the LRA table shows it."""
    from analysis.records import load
    from analysis.render import lra_notes
    from analysis.tables import lra_table

    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "assets"))
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))
    cfg = compose_cfg(f"experiment=lra/{task}-smoke", *overrides, f"store={tmp_path}/r.jsonl",
                      f"runner.checkpoint_dir={tmp_path}/ck", tiny=False)
    rec = run(cfg)[0]
    assert rec.status == "skipped" and rec.error.startswith("not run: data absent (") and why in rec.error
    df = load(tmp_path / "r.jsonl")
    assert lra_table(df).set_index("method").loc["dense", task] == "not run: data absent"
    assert "not run: data absent" in lra_notes(df)


def test_text_from_an_unreachable_hub_is_not_run(compose_cfg, tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'imdb' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))
    cfg = compose_cfg("experiment=lra/text-smoke", f"store={tmp_path}/r.jsonl",
                      f"runner.checkpoint_dir={tmp_path}/ck", tiny=False)
    rec = run(cfg)[0]
    assert rec.status == "skipped" and "'imdb' could not be loaded (ConnectionError" in rec.error


def test_lra_notes_say_the_image_task_is_fashion_mnist_not_cifar10():
    import json

    import pandas as pd

    from analysis.render import lra_notes

    df = pd.DataFrame({"task": ["lra/image"], "status": ["ok"],
                       "config_key": [json.dumps({"task.source": "fashion_mnist"})]})
    assert "Fashion-MNIST" in lra_notes(df) and "CIFAR-10" in lra_notes(df)
    assert lra_notes(df.assign(config_key=json.dumps({"task.source": "cifar10"}))) == ""


@pytest.mark.skipif(__import__("shutil").which("dpkg-deb") is None, reason="needs dpkg-deb to build a .deb")
def test_fetch_assets_takes_the_image_idx_files_out_of_the_debian_package(tmp_path, monkeypatch):
    """fetch_assets' Fashion-MNIST step on a .deb built here with the package's layout (apt-get
    download replaced): the four idx files land in the asset folder with their sha256, and the
    image task reads them."""
    import hashlib
    import importlib.util
    import json
    import shutil
    import subprocess

    spec = importlib.util.spec_from_file_location("fetch_assets", ROOT / "scripts" / "fetch_assets.py")
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)
    pkg = tmp_path / "pkg"
    _fashion_folder(pkg / "usr" / "share" / "datasets" / "fashion-mnist", n_train=20, n_test=5)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text("Package: dataset-fashion-mnist\nVersion: 0.0~test-1\n"
                                           "Architecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    deb = tmp_path / "dataset-fashion-mnist_0.0~test-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True,
                   capture_output=True)

    def fake_download(packages, dest):
        assert packages == ["dataset-fashion-mnist"]
        return [Path(shutil.copy(deb, dest))]

    monkeypatch.setattr(fa, "_apt_download", fake_download)
    folder = fa.fetch("fashion_mnist", tmp_path / "assets")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert sorted(manifest["files"]) == sorted(f for pair in image.FILES.values() for f in pair)
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    x, y = image.idx_split(folder, "test")
    assert x.shape == (5, 784) and y.tolist() == [0, 1, 2, 3, 4]
