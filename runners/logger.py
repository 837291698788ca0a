"""Optional experiment tracking. ``logger=wandb`` sends the run's config, each record's
metrics, latencies and memory, and the records as a table to Weights & Biases; it never
decides whether a run succeeds (a tracking failure is logged and the records stay)."""
from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("attnbench")


def _flat(rec) -> dict:
    out = {"seq_len": rec.seq_len, "status": rec.status}
    out.update({f"metrics/{k}": v for k, v in rec.metrics.items() if isinstance(v, (int, float))})
    for phase, q in rec.latency_ms.items():
        out.update({f"latency_ms/{phase}/{k}": v for k, v in q.items() if isinstance(v, (int, float))})
    out.update({f"peak_mem_bytes/{k}": v for k, v in rec.peak_mem_bytes.items() if v is not None})
    out.update({f"cost/{k}": v for k, v in (rec.cost or {}).items()})
    return out


def log_records(cfg: DictConfig, recs) -> None:
    lg = cfg.get("logger")
    if lg is None or lg.name == "none" or not recs:
        return
    if lg.name != "wandb":
        raise ValueError(f"unknown logger {lg.name!r}; choose none or wandb")
    try:
        import wandb
    except ImportError as exc:
        raise ImportError("logger=wandb needs W&B: pip install 'attnbench[wandb]'") from exc
    r0 = recs[0]
    try:
        run = wandb.init(project=lg.project, entity=lg.entity, mode=lg.mode, dir=lg.dir,
                         tags=list(lg.tags), name=f"{r0.method}-{r0.task}-{r0.run_id[:8]}",
                         config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
        for rec in recs:
            for i, loss in enumerate((rec.train or {}).get("loss_curve", [])):
                run.log({"train/loss": loss, "train/point": i})
            run.log(_flat(rec))
        cols = ["run_id", "method", "impl", "seq_len", "status", "record"]
        run.log({"records": wandb.Table(columns=cols, data=[
            [r.run_id, r.method, r.impl, r.seq_len, r.status, r.to_json()] for r in recs])})
        run.finish()
    except Exception as exc:  # noqa: BLE001 - tracking is never required
        log.warning("W&B logging failed (%s); the records are in %s", exc, cfg.store)
