"""On-disk cache of generated or tokenised data, keyed by everything that shapes it."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNBENCH_DATA", ".cache/attnbench"))


def cached(kind: str, key: dict, build: Callable[[], dict]) -> dict:
    """Load ``kind``'s data for ``key`` from the cache, or build it, save it and return it.
    A file is written under a temporary name and renamed, so a killed build leaves none."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / kind / f"{digest}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({**data, "key": key}, tmp)
    os.replace(tmp, path)
    (path.with_suffix(".json")).write_text(json.dumps(key, indent=1, default=str))
    return data
