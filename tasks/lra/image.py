"""LRA Image (Tay et al. 2021, Sec. 2.4): an image classified from its pixels read as one
sequence of grayscale tokens (value + 1; 0 is padding, a black pixel is token 1).

The original task is CIFAR-10 (32 x 32, 1024 pixels, 10 classes). CIFAR-10 is not reachable
here (no dataset hub), so attnbench's default is Fashion-MNIST (Xiao, Rasul and Vollgraf 2017:
28 x 28 grayscale, 784 pixels, 10 classes, 60k train / 10k test), from the Debian package
``dataset-fashion-mnist`` (MIT), fetched on demand into the asset cache by
``python scripts/fetch_assets.py --fashion-mnist``: its four idx files, read here
(``read_idx``). The validation split is a seeded sample of ``num_val`` training images. Results
on it are not comparable with published LRA Image numbers (a different, easier data set).

CIFAR-10 itself (or any image set) goes through ``tasks/lra/hub.py``: ``task.source=cifar10
task.max_len=1024`` where the hub is reachable, or ``++task.data_files...`` (parquet) offline.
Absent data gives a record "not run: data absent" with the command that fetches it.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from tasks.cache import cached
from tasks.corpora import cache_dir as asset_cache
from tasks.lra import hub
from tasks.lra.base import DataAbsent, LRATask

FASHION = "fashion_mnist"  # the asset's folder in the cache (scripts/fetch_assets.py)
FETCH = "python scripts/fetch_assets.py --fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# the idx format (LeCun's MNIST files): 0, 0, a type code, the number of dimensions, then each
# dimension as a big-endian uint32, then the values big-endian in C order
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """The array in an idx file (gzip-compressed when its name ends in .gz); a ValueError
    naming the file and the problem when it is not a well-formed idx file."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (the magic number must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated header ({ndim} dimensions announced)")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dt = IDX_TYPES[code]
    want = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != want:
        raise ValueError(f"{path}: {len(body)} bytes of data, the header {tuple(dims)} of {dt} needs {want}")
    return np.frombuffer(body, dtype=dt).reshape(dims).astype(dt.newbyteorder("="))


def idx_split(folder, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N, H*W] int16 = pixel + 1, labels [N] int64) of one split's idx files."""
    images, labels = (read_idx(Path(folder) / f) for f in FILES[split])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.int16) + 1)
    return x, torch.from_numpy(labels.astype(np.int64))


def fashion_mnist(cfg, folder=None) -> dict:
    """The Fashion-MNIST splits from the fetched idx files (``folder``: the asset's, default)."""
    folder = Path(folder) if folder is not None else asset_cache() / FASHION
    if not all((folder / f).exists() for pair in FILES.values() for f in pair):
        raise DataAbsent(f"LRA image: Fashion-MNIST is not in {folder}: fetch it with `{FETCH}` "
                         "(Debian package dataset-fashion-mnist, 31 MB)")
    side = int(round(int(cfg.max_len) ** 0.5))
    if side * side != int(cfg.max_len) or side != 28:
        raise ValueError(f"LRA image on Fashion-MNIST: max_len must be 784 (28 x 28 pixels), got {cfg.max_len}")

    def build():
        (x, y), test = idx_split(folder, "train"), idx_split(folder, "test")
        n_val = min(int(cfg.num_val), len(y) // 5)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(cfg.seed)))
        return {"train": (x[perm[n_val:]], y[perm[n_val:]]), "val": (x[perm[:n_val]], y[perm[:n_val]]),
                "test": test}

    key = {"task": "image", "source": FASHION, "folder": str(folder), "num_val": int(cfg.num_val),
           "seed": int(cfg.seed), "sizes": {p: (folder / p).stat().st_size for pair in FILES.values() for p in pair}}
    data = cached("lra_image", key, build)
    return {**{s: data[s] for s in ("train", "val", "test")}, "vocab_size": 257, "num_classes": 10,
            "pad_id": hub.PAD, "cls_id": None, "truncated": 0}


class Image(LRATask):
    def load(self) -> dict:
        if self.cfg.get("source") == FASHION and not self.cfg.get("data_files"):
            return fashion_mnist(self.cfg)
        return hub.image(self.cfg)
