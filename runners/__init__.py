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


def with_press(cfg: DictConfig) -> DictConfig:
    """The config with the top-level ``press`` shorthand applied and removed (so a run's identity
    is its method's and task's): ``press.ratio`` sets the method's ``ratio`` (a KV-cache press,
    ``methods.press``; refused for any other method, and for FastGen, whose budget is its
    ``recovery``), ``press.setting`` the task's ``setting`` (query_aware | query_agnostic)."""
    press = cfg.get("press")
    if press is None:
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    ratio, setting = press.get("ratio"), press.get("setting")
    if ratio is not None:
        target = str(cfg.method.get("_target_", ""))
        if "ratio" not in cfg.method or cfg.method.get("recovery") is not None:
            raise ValueError(f"press.ratio applies to a KV-cache press with a ratio; {target} has none"
                             + (" (FastGen's budget is method.recovery)" if "fastgen" in target else ""))
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"press.ratio (the share of the prompt's tokens evicted) must be in (0, 1), got {ratio!r}")
        cfg.method.ratio = float(ratio)
    if setting is not None:
        if setting not in ("query_aware", "query_agnostic"):
            raise ValueError(f"press.setting must be query_aware or query_agnostic, got {setting!r}")
        cfg.task.setting = setting
    del cfg["press"]
    return cfg


def run(cfg: DictConfig) -> list[RunRecord]:
    """Run one composed config; returns the records it appended to ``cfg.store``."""
    cfg = with_press(with_impl(cfg))
    runner = instantiate(cfg.runner, _convert_="all")
    check_writable(cfg.store)  # and every other output path: before any compute is spent
    for what, folder in getattr(runner, "output_dirs", dict)().items():
        check_writable(folder, what, is_dir=True)
    return runner.run(cfg)
