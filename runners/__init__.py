"""Runners: ``run(cfg)`` builds, checks, measures and appends records for one composed config."""
from __future__ import annotations

from omegaconf import DictConfig

from runners.records import RunRecord

RUNNERS = ("kernel", "train", "evaluate")


def run(cfg: DictConfig) -> list[RunRecord]:
    """Run one composed config; returns the records it appended to ``cfg.store``."""
    name = cfg.runner.name
    if name == "kernel":
        from runners import kernel

        return kernel.run(cfg)
    if name == "train":
        from runners import train

        return train.run(cfg)
    if name == "evaluate":
        from runners import evaluate

        return evaluate.run(cfg)
    raise ValueError(f"unknown runner {name!r}; known runners: {', '.join(RUNNERS)}")
