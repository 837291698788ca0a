"""Attention methods. The list of methods is the list of files in ``conf/method/``.

    import methods
    m = methods.load("dense", num_heads=8, head_dim=64, impl="reference")
    o = m(q, k, v, causal=True)
"""
from __future__ import annotations

from pathlib import Path

from methods.base import AttentionInputError, AttentionMethod, Cost

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STRUCTURAL = ("num_heads", "head_dim", "max_seq_len", "num_kv_heads")
STRUCTURAL_DEFAULTS = {"num_heads": 8, "head_dim": 64, "max_seq_len": 4096}

__all__ = ["AttentionInputError", "AttentionMethod", "Cost", "available", "build", "load", "CONF_DIR"]


def available() -> list[str]:
    """Names of every method: the files in conf/method/."""
    return sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def compose_method(name: str):
    """Compose ``conf/method/<name>.yaml`` through Hydra (the same config the CLI uses)."""
    known = available()
    if name not in known:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=[f"method={name}"]).method
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"method={name}"]).method


def build(method_cfg, **structural) -> AttentionMethod:
    """Instantiate a composed method config with the model's structural arguments."""
    from hydra.utils import instantiate

    factory = instantiate(method_cfg)
    return factory(**structural) if callable(factory) and not isinstance(factory, AttentionMethod) else factory


def load(name: str, **kwargs) -> AttentionMethod:
    """Compose a method's config, apply ``kwargs`` (hyperparameters or structural
    arguments), and return a ready instance, e.g.
    ``methods.load("nystrom", num_heads=8, head_dim=64, num_landmarks=32)``."""
    from omegaconf import OmegaConf

    cfg = compose_method(name)
    structural = {**STRUCTURAL_DEFAULTS, **{k: kwargs.pop(k) for k in list(kwargs) if k in STRUCTURAL}}
    hyper = [k for k in cfg if not str(k).startswith("_")]
    unknown = [k for k in kwargs if k not in hyper]
    if unknown:
        raise ValueError(
            f"method {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"its hyperparameters: {', '.join(hyper)}; structural: {', '.join(STRUCTURAL)}"
        )
    cfg = OmegaConf.merge(cfg, kwargs)
    return build(cfg, **structural)
