"""What every runner needs from a composed config: device, dtype, the method, a record."""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from runners import records

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} asked for, but no CUDA device is available")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {list(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on the GPU when the run is bf16; a no-op context otherwise."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def attention_method(model):
    """The attention method of a model's first layer (LRA encoder or decoder LM)."""
    first = model.blocks[0]
    return first.method if hasattr(first, "method") else first.attn.method


def method_cfg(cfg: DictConfig) -> DictConfig:
    """The method config, with the top-level ``impl`` shorthand applied."""
    m = cfg.method
    if cfg.get("impl") is not None:
        m = OmegaConf.merge(m, {"impl": cfg.impl})
    return m


def method_name(cfg: DictConfig) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices["method"]
    except Exception:  # noqa: BLE001 - outside a Hydra app (tests call run(cfg) directly)
        target = str(cfg.method.get("_target_", "unknown.unknown"))
        return target.split(".")[-2]  # methods.<name>.<Class>: a method file is named as its config


def build_method(cfg: DictConfig, **structural) -> methods.AttentionMethod:
    return methods.build(method_cfg(cfg), **structural)


def hyperparameters(cfg: DictConfig) -> dict:
    m = OmegaConf.to_container(method_cfg(cfg), resolve=True)
    return {k: v for k, v in m.items() if not k.startswith("_")}


def base_record(cfg: DictConfig, device, dtype, **fields) -> records.RunRecord:
    config = OmegaConf.to_container(cfg, resolve=True)
    extra = {k: fields[k] for k in ("seq_len",) if k in fields}
    base = dict(
        run_id=records.run_id(config, **extra),
        time=records.now(),
        git_commit=records.git_commit(),
        config=config,
        seed=int(cfg.seed),
        method=method_name(cfg),
        method_params=hyperparameters(cfg),
        impl=str(method_cfg(cfg).get("impl", "reference")),
        real_kernel=False,
        model=str(cfg.model.name),
        task=str(cfg.task.name),
        runner=str(cfg.runner.name),
        seq_len=None,
        batch_size=int(cfg.model.get("batch_size", 1)),
        dtype=str(dtype).replace("torch.", ""),
        device=str(device),
        env=records.environment(device),
    )
    base.update(fields)
    return records.RunRecord(**base)
