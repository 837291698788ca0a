"""LRA tasks whose data comes from elsewhere, loaded through ``datasets`` (a hub name or
local files) and tokenised as LRA does; cached on disk by everything that shapes them.

text       IMDB reviews, byte level (Maas et al. 2011): UTF-8 bytes, 2 classes
retrieval  AAN citation pairs (Radev et al. 2013), byte level, two documents, 2 classes
image      CIFAR-10 (Krizhevsky 2009) as 1024 grayscale pixels (0.2989 R + 0.587 G + 0.114 B,
           LRA's conversion), 10 classes: the original task, through this module with
           ``task.source=cifar10`` or ``data_files``; the default image task here is
           Fashion-MNIST from its Debian package (``tasks/lra/image.py``)

Tokens are byte or pixel values + 1 (0 is padding; a black pixel is not padding). LRA cuts
documents at ``max_len`` (that cut is part of the benchmark); the number cut is reported in
the data's ``truncated`` count. The validation split is a seeded sample of ``num_val``
training examples unless the source has a validation split.

Getting the data: with network access, the hub names (``imdb``, ``cifar10``; AAN pairs are
in the LRA release, ``lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv``) download
on first use; offline, point ``data_files`` at local csv/json/parquet/tsv files with the
columns named in the task config. Data that is not there (a missing file, no source, the hub
unreachable) raises ``DataAbsent``: the run's record says "not run: data absent (why)".
"""
from __future__ import annotations

from pathlib import Path

import torch

from tasks.cache import cached
from tasks.lra.base import DataAbsent

PAD = 0
HOW = {"text": "IMDB reviews as csv/json/parquet with columns text, label",
       "retrieval": "the LRA release's lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv",
       "image": "images and labels as parquet, or task.source=fashion_mnist"}


def _load(cfg, kind="text"):
    """The dataset from local files or the hub; DataAbsent (the run is "not run: data absent")
    when a file is missing, no source is set, or the hub cannot be reached."""
    import datasets

    if cfg.get("data_files"):
        files = {k: str(v) for k, v in cfg.data_files.items()}
        missing = [f"{k}={v}" for k, v in files.items() if not Path(v).exists()]
        if missing:
            raise DataAbsent(f"LRA {kind}: data file(s) not found: {', '.join(missing)}")
        fmt = cfg.get("format") or next(iter(files.values())).rsplit(".", 1)[-1]
        kw = {"delimiter": "\t"} if fmt == "tsv" else {}
        return datasets.load_dataset("csv" if fmt == "tsv" else fmt, data_files=files, **kw)
    if not cfg.get("source"):
        raise DataAbsent(f"LRA {kind}: no data here: set ++task.data_files.train=... and "
                         f"++task.data_files.test=... ({HOW.get(kind, 'see tasks/lra/hub.py')})")
    try:
        return datasets.load_dataset(cfg.source)
    except OSError as e:  # ConnectionError (no network), FileNotFoundError (no such dataset)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataAbsent(f"LRA {kind}: the hub dataset {cfg.source!r} could not be loaded "
                         f"({type(e).__name__}: {first}); offline, set ++task.data_files") from e


def _splits(ds, cfg):
    """train / val / test lists of examples."""
    train = ds["train"]
    test = ds[cfg.get("test_split", "test")]
    if "validation" in ds:
        return train, ds["validation"], test
    n_val = min(int(cfg.num_val), len(train) // 5)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(int(cfg.seed))).tolist()
    return train.select(perm[n_val:]), train.select(perm[:n_val]), test


def encode_bytes(texts, max_len: int):
    x = torch.zeros(len(texts), max_len, dtype=torch.int16)
    cut = 0
    for i, t in enumerate(texts):
        b = t.encode("utf-8")
        cut += len(b) > max_len
        b = b[:max_len]
        x[i, : len(b)] = torch.tensor(list(b), dtype=torch.int16) + 1
    return x, cut


def grayscale_tokens(img) -> torch.Tensor:
    """A PIL image or an [H, W(, 3)] array -> [H*W] tokens (grayscale value + 1)."""
    t = torch.tensor(__import__("numpy").array(img), dtype=torch.float64)
    if t.dim() == 3:
        t = t[..., 0] * 0.2989 + t[..., 1] * 0.587 + t[..., 2] * 0.114
    return t.round().clamp(0, 255).to(torch.int16).flatten() + 1


def _build(cfg, kind):
    ds = _load(cfg, kind)
    out, cut = {}, 0
    for name, split in zip(("train", "val", "test"), _splits(ds, cfg)):
        y = torch.tensor(split[cfg.label_column], dtype=torch.long)
        if kind == "text":
            x, c = encode_bytes(split[cfg.text_column], int(cfg.max_len))
        elif kind == "retrieval":
            x1, c1 = encode_bytes(split[cfg.text_columns[0]], int(cfg.max_len))
            x2, c2 = encode_bytes(split[cfg.text_columns[1]], int(cfg.max_len))
            x, c = (x1, x2), c1 + c2
        else:
            x, c = torch.stack([grayscale_tokens(im) for im in split[cfg.image_column]]), 0
            if x.shape[1] != int(cfg.max_len):
                raise ValueError(f"images have {x.shape[1]} pixels, the task expects max_len={cfg.max_len}")
        out[name] = (x, y)
        cut += c
    out["truncated"] = cut
    return out


def _task(cfg, kind, vocab, classes):
    key = {"task": kind, "source": cfg.get("source"), "files": dict(cfg.get("data_files") or {}),
           "max_len": int(cfg.max_len), "num_val": int(cfg.num_val), "seed": int(cfg.seed)}
    data = cached(f"lra_{kind}", key, lambda: _build(cfg, kind))
    return {**{s: data[s] for s in ("train", "val", "test")}, "vocab_size": vocab,
            "num_classes": int(cfg.get("num_classes", classes)), "pad_id": PAD, "cls_id": None,
            "truncated": data["truncated"]}


def text(cfg):
    return _task(cfg, "text", 257, 2)


def retrieval(cfg):
    return _task(cfg, "retrieval", 257, 2)


def image(cfg):
    return _task(cfg, "image", 257, 10)
