"""Runners: ``run(cfg)`` builds, checks, measures and appends records for one composed config.

The runner is the config's ``runner`` (conf/runner/*.yaml, built through its ``_target_``); it
builds the model and the task the same way, with the method config (conf/method/*.yaml).
"""
from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from runners.records import RunRecord, check_writable


def with_impl(cfg: DictConfig) -> DictConfig:
    """The config with the top-level ``impl`` shorthand (``-m impl=reference,sdpa``) applied to
    the method config."""
    if cfg.get("impl") is None:
        return cfg
    return OmegaConf.merge(cfg, {"method": {"impl": cfg.impl}})


def run(cfg: DictConfig) -> list[RunRecord]:
    """Run one composed config; returns the records it appended to ``cfg.store``."""
    cfg = with_impl(cfg)
    runner = instantiate(cfg.runner, _convert_="all")
    check_writable(cfg.store)  # and every other output path: before any compute is spent
    for what, folder in getattr(runner, "output_dirs", dict)().items():
        check_writable(folder, what, is_dir=True)
    return runner.run(cfg)
