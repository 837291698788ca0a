"""runner=evaluate: a trained language model, with any method swapped in, on a generation
task (task=needle, task=ruler: the task's own evaluation), one record per run with every cell
of its grid.

The checkpoint (``runner.checkpoint``, a ``best.pt`` of the training runner) is loaded into
the model built with the configured method: training-free methods replace the attention of
a model trained with another one; parameters the new method has and the checkpoint lacks
keep their initialisation, and the record lists them. Without a checkpoint the model is
randomly initialised (for tests of the pipeline only; the record says so).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from runners import records
from runners.device import autocast, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class EvaluateRunner:
    """conf/runner/evaluate.yaml."""

    checkpoint: str | None  # best.pt (or last.pt) of a training run; None: random init
    max_len: int  # the model's window
    max_new_tokens: int
    cpu_threads: int
    force: bool

    def run(self, cfg: DictConfig) -> list[records.RunRecord]:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        if device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        rec = records.new(cfg, device, dtype, seq_len=max(int(x) for x in cfg.task.lengths), causal=True)
        with records.claim(cfg.store, rec.run_id) as mine:
            if not mine:
                log.info("run_id %s is being run by another process; skipped", rec.run_id)
                return []
            if not self.force and rec.run_id in records.done_ids(cfg.store):
                log.info("an ok record with run_id %s exists; skipped", rec.run_id)
                return []
            try:
                task = instantiate(cfg.task)
                model = instantiate(cfg.model, method=cfg.method, vocab_size=256, num_classes=256,
                                    max_len=self.max_len, _recursive_=False).to(device).eval()
                rec.details.update(self._load_checkpoint(model, device, records.names(cfg)["model"]))
                rec.metrics.update(task.evaluate(model, device, autocast(device, dtype),
                                                 self.max_new_tokens, int(cfg.seed)))
                rec.details["decode_fallback"] = getattr(model, "decode_fallback", None)
                rec.real_kernel = bool(model.method.real_kernel)
            except Exception as exc:  # noqa: BLE001 - recorded; a sweep goes on
                records.fail(rec, exc)
                log.error("evaluation failed: %s", rec.error)
            records.append(cfg.store, rec)
        return [rec]

    def _load_checkpoint(self, model, device, model_name: str) -> dict:
        """Load ``checkpoint`` (a model's state, or a training state holding one) into
        ``model``; what the record says about it."""
        info = {"checkpoint": self.checkpoint}
        if not self.checkpoint:
            info["note"] = "random initialisation (no checkpoint): a pipeline test, not a result"
            return info
        state = records.load_checkpoint(self.checkpoint, map_location=device)
        if isinstance(state, dict) and "model" in state and "opt" in state:  # a training state
            state = state["model"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        # only the swapped-in method's own parameters may be new (e.g. a Performer's projection)
        lost = [k for k in missing if ".method." not in k]
        if lost or unexpected:
            raise ValueError(f"checkpoint {self.checkpoint} does not fit the model "
                             f"(model={model_name}): missing {lost[:5]}"
                             f"{'...' if len(lost) > 5 else ''}, unexpected {list(unexpected)[:5]}")
        info.update(missing_keys=list(missing), unexpected_keys=list(unexpected))
        return info
