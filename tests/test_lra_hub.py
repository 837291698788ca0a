"""LRA Text, Retrieval and Image: the real `datasets` loaders on fixture files the tests write."""
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from runners import run
from tasks.lra import hub


@pytest.fixture
def fixtures(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "é", "actor", "boring", "great"]

    def text(n):
        return [" ".join(rng.choice(words, size=rng.integers(5, 120))) for _ in range(n)]

    for split, n in (("train", 48), ("test", 16)):
        datasets.Dataset.from_dict({"text": text(n), "label": rng.integers(0, 2, n).tolist()}).to_csv(
            tmp_path / f"imdb_{split}.csv", index=False)
        with open(tmp_path / f"aan_{split}.tsv", "w") as f:
            f.write("label\ttext1\ttext2\n")
            for a, b, y in zip(text(n), text(n), rng.integers(0, 2, n)):
                f.write(f"{y}\t{a}\t{b}\n")
        imgs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)]
        feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
        datasets.Dataset.from_dict({"img": imgs, "label": rng.integers(0, 10, n).tolist()},
                                   features=feats).to_parquet(tmp_path / f"cifar_{split}.parquet")
    return {
        "text": [f"++task.data_files.train={tmp_path}/imdb_train.csv", f"++task.data_files.test={tmp_path}/imdb_test.csv"],
        "retrieval": [f"++task.data_files.train={tmp_path}/aan_train.tsv", f"++task.data_files.test={tmp_path}/aan_test.tsv"],
        "image": [f"++task.data_files.train={tmp_path}/cifar_train.parquet",
                  f"++task.data_files.test={tmp_path}/cifar_test.parquet"],
    }


@pytest.mark.parametrize("task", ["text", "retrieval", "image"])
def test_loaders_read_fixture_files(task, fixtures, compose_cfg):
    cfg = compose_cfg(f"experiment=lra/{task}-smoke", *fixtures[task], tiny=False)
    data = instantiate(cfg.task).load()  # tasks/lra/{text,retrieval,image}.py through hub.py
    x, y = data["train"]
    assert len(y) == 48 - 8 and len(data["val"][1]) == 8 and len(data["test"][1]) == 16
    xs = x if isinstance(x, tuple) else (x,)
    for t in xs:
        assert t.shape[1] == 256 and int(t.max()) <= 256 and data["vocab_size"] == 257
    if task == "image":
        assert bool((x > 0).all()), "every pixel is a token (a black pixel is not padding)"
    else:
        assert data["truncated"] > 0  # some fixture documents exceed 256 bytes: cut, and counted


def test_byte_and_pixel_encoding():
    x, cut = hub.encode_bytes(["é a"], 8)
    assert x[0, :4].tolist() == [0xC3 + 1, 0xA9 + 1, ord(" ") + 1, ord("a") + 1] and cut == 0
    img = np.zeros((2, 2, 3), dtype=np.uint8)
    img[0, 0] = (255, 255, 255)
    img[1, 1] = (100, 0, 0)
    assert hub.grayscale_tokens(img).tolist() == [256, 1, 1, round(100 * 0.2989) + 1]


# The loaders are what this module tests; that the LRA encoder trains with one method of each
# family is tests/test_lra.py's smoke test, and every method's training test_layers.py's. Here
# each task's data trains two methods, six kinds over the three tasks: exact, sparse with a kernel
# path, data-dependent sparse, low-rank, linear, routed.
KINDS = {"text": ["dense", "linformer"], "retrieval": ["bigbird", "performer"],
         "image": ["minference", "routing_transformer"]}


@pytest.mark.parametrize("task,method_name", [(t, m) for t, ms in KINDS.items() for m in ms])
def test_smoke_trains_with_each_kind_of_method(task, fixtures, compose_cfg, tmp_path, method_name):
    cfg = compose_cfg(f"experiment=lra/{task}-smoke", *fixtures[task],
                      f"method={method_name}", f"runner.checkpoint_dir={tmp_path}/ck",
                      f"store={tmp_path}/r.jsonl", tiny=False)
    rec = run(cfg)[0]
    assert rec.status == "ok", rec.error
    assert rec.train["steps"] == 6 and torch.isfinite(torch.tensor(rec.train["loss_curve"])).all()
