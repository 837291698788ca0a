"""Pathfinder / Path-X generator and their smoke experiments."""
from collections import deque

import numpy as np
import pytest
import torch

from runners import run
from tasks.lra import pathfinder


def connected(img, a, b):
    """8-connected flood fill over lit pixels from a's pixel to b's (independent check)."""
    size = img.shape[0]
    start, goal = (int(a[1]), int(a[0])), (int(b[1]), int(b[0]))
    seen, todo = {start}, deque([start])
    while todo:
        y, x = todo.popleft()
        if (y, x) == goal:
            return True
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                n = (y + dy, x + dx)
                if 0 <= n[0] < size and 0 <= n[1] < size and n not in seen and img[n] > 0:
                    seen.add(n)
                    todo.append(n)
    return False


def test_generator_is_deterministic_balanced_and_sized():
    a, la = pathfinder.generate(40, seed=1)
    b, lb = pathfinder.generate(40, seed=1)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, pathfinder.generate(40, seed=2)[0])
    assert la.sum() == 20 and a.shape == (40, 32, 32) and a.dtype == np.uint8
    big, _ = pathfinder.generate(2, seed=0, size=128)
    assert big.shape == (2, 128, 128)


def test_labels_mean_what_they_say():
    """Positives: drawn without gaps, their dots are always joined by lit pixels. Every
    sample: label 1 exactly when one drawn contour has a dot at each of its two ends."""
    rng = np.random.default_rng(0)
    for i in range(60):
        label = i % 2
        img, meta = pathfinder.render(rng, label, num_distractors=0, dash_fill=1.0)
        if label:
            assert connected(img, *meta["dots"])
        d0, d1 = (np.asarray(d) for d in meta["dots"])
        same = any({tuple(c[0]), tuple(c[-1])} == {tuple(d0), tuple(d1)} for c in (meta["a"], meta["b"]))
        assert same == bool(label)
    img, meta = pathfinder.render(rng, 1)
    for d in meta["dots"]:  # the dots are drawn
        assert img[int(d[1]), int(d[0])] == 255


@pytest.mark.parametrize("exp", ["pathfinder-smoke", "pathx-smoke"])
def test_smoke_trains(exp, compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))
    for method in ("dense", "bigbird", "performer"):
        cfg = compose_cfg(f"experiment=lra/{exp}", f"method={method}", f"runner.checkpoint_dir={tmp_path}/ck",
                          f"store={tmp_path}/r.jsonl", tiny=False)
        rec = run(cfg)[0]
        assert rec.status == "ok", rec.error
        assert torch.isfinite(torch.tensor(rec.train["loss_curve"])).all()
    data = pathfinder.load(cfg.task)
    assert data["train"][0].shape == (64, 256) and int(data["train"][1].sum()) == 32


def test_max_len_must_match_the_image(compose_cfg):
    cfg = compose_cfg("experiment=lra/pathfinder-smoke", "task.max_len=300", tiny=False)
    with pytest.raises(ValueError, match="size \\* size"):
        pathfinder.load(cfg.task)
