"""runner=pretrained: a method inside a real pretrained model (model=smollm2_135m) on a task
with real text (task=perplexity, needle or fidelity: their ``evaluate_pretrained``), one
record per run, in one pass:

  build    the task, then the model with every attention layer through the method (the
           method is built at the model's head layout first: a method that cannot run there
           fails before any weight is loaded); for task=fidelity the model runs dense attention
           (it supplies the real q/k/v) and the method is measured on what it captures
  measure  the task's quality metrics; the prefill latency and peak memory of one forward
           pass at the task's length through the method (logits of the last position only,
           as a prefill before generation computes them); for a method that builds an index
           (``has_index``), one more forward under ``index_timing(True)``: ``metrics.index_ms``,
           the index steps of all layers summed (synced), and ``metrics.index_layers``
  record   the model's name and file hash, the text source and the tokens evaluated

A KV-cache press (``methods.press``) runs in a model built on ``models.hf_decode``: a press that
calibrates (RazorAttention's retrieval heads, Eigen Attention's basis) is calibrated first on
prose (``tasks.real_text.calibration_ids``), the tasks answer on the cache compressed once
after the prefill, and the timed prefill is the prefill plus the compression.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import methods
from runners import bench, records
from runners.device import resolve_device, resolve_dtype
from tasks.fidelity import Fidelity

log = logging.getLogger(__name__)


def model_inputs(cfg) -> dict:
    """{"model_file": path} of the pretrained model's weights (part of the run's identity:
    ``records.identity`` hashes it), or {} where the model class names no known file."""
    from hydra.utils import get_class

    from models.pretrained import SPECS, cache_dir

    try:
        name = get_class(str(cfg.model._target_)).model_name
        folder, gguf, _ = SPECS[name]
    except (AttributeError, KeyError, ImportError, ValueError):
        return {}
    return {"model_file": str(cache_dir() / folder / gguf)}


def check_press_task(cfg) -> None:
    """A KV-cache press (``methods.press``) answers only through a compressed cache: refused,
    before anything is built or loaded, on a task that does not generate through one
    (``runs_on_press``: needle, ruler, multiturn); task=fidelity measures the method on a dense
    model's q/k/v and takes any method."""
    from hydra.utils import get_class

    from methods.press import Press

    try:
        method, task = get_class(str(cfg.method._target_)), get_class(str(cfg.task._target_))
    except (AttributeError, ImportError, ValueError):
        return  # a composed config without a class path: the build reports it
    if isinstance(method, type) and issubclass(method, Press) and not issubclass(task, Fidelity) \
            and not getattr(task, "runs_on_press", False):
        raise ValueError(f"method={getattr(method, 'name', method.__name__)} is a KV-cache press: it runs on tasks "
                         f"that generate through the compressed cache (task=needle, ruler or multiturn), not "
                         f"task={task.__name__.lower()} (its forward pass keeps no cache to compress)")


@dataclass
class PretrainedRunner:
    """conf/runner/pretrained.yaml."""

    timing_len: int  # tokens of the timed prefill
    warmup: int
    repeats: int
    rep_ms: int
    cpu_threads: int
    force: bool
    timed_tasks: list | None = None  # tasks whose records time the prefill (None: all but fidelity)

    def run(self, cfg: DictConfig) -> list[records.RunRecord]:
        check_press_task(cfg)
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        if device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        rec = records.new(cfg, device, dtype, seq_len=int(cfg.task.get("seq_len") or self.timing_len),
                          causal=True, inputs=model_inputs(cfg))
        with records.claim(cfg.store, rec.run_id) as mine:
            if not mine:
                log.info("run_id %s is being run by another process; skipped", rec.run_id)
                return []
            if not self.force and rec.run_id in records.done_ids(cfg.store):
                log.info("an ok record with run_id %s exists; skipped", rec.run_id)
                return []
            self._run(rec, cfg, device, dtype)
            records.append(cfg.store, rec)
        return [rec]

    def _run(self, rec, cfg, device, dtype) -> None:
        try:
            torch.manual_seed(int(cfg.seed))  # a method's initial weights (random features, projections)
            task = instantiate(cfg.task)
            if not hasattr(task, "evaluate_pretrained"):
                raise ValueError(f"task={rec.task} has no evaluation on a pretrained model; "
                                 "use task=perplexity, needle, fidelity, ruler or lm_harness")
            fidelity = isinstance(task, Fidelity)
            model_method = methods.compose_method("dense") if fidelity else cfg.method
            model = instantiate(cfg.model, method=model_method, _recursive_=False).to(device, dtype).eval()
            a = model.asset
            method = methods.build(cfg.method, num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"],
                                   head_dim=a["head_dim"], max_seq_len=a["context"]).to(device)
            rec.details["model_asset"] = a
            rec.details["method_weights"] = "initialisation (training-free use)" if any(
                True for _ in method.parameters()) else "none"
            rec.details["decode"] = "no decode step: answers are scored in the prefill pass"
            if getattr(model, "pressed", False):
                rec.details["decode"] = ("KV-cache press: prefill, compression once, then decode steps on the "
                                         "compressed cache (models.hf_decode)")
                self._calibrate(rec, model)
            with torch.no_grad():
                if fidelity:
                    result = task.evaluate_pretrained(model, method, int(cfg.seed))
                else:
                    result = task.evaluate_pretrained(model, int(cfg.seed))
                    if self.timed_tasks is None or rec.task in self.timed_tasks:
                        self._measure(rec, model, device)
            for k, v in result.items():  # numbers (and cells of them) are metrics; text, examples: details
                (rec.details if isinstance(v, str) or k in ("examples", "press") else rec.metrics)[k] = v
            rec.real_kernel = bool(method.real_kernel) if fidelity else self._ran_real_kernel(model)
            rec.details["method_is_causal"] = bool(method.supports_causal)
        except Exception as exc:  # noqa: BLE001 - recorded; a sweep goes on
            records.fail(rec, exc)
            log.error("%s on %s failed: %s", rec.method, rec.task, rec.error)

    @staticmethod
    def _calibrate(rec, model) -> None:
        """A press that needs calibration (``needs_calibration``) calibrated on prose."""
        from tasks.real_text import calibration_ids

        press = model.press
        if not press.needs_calibration:
            return
        ids, period = calibration_ids(model.tokenizer, press.calibration_text)
        got = model.calibrate(ids, period)
        rec.details["calibration"] = {"text": f"prose:austen, {ids.shape[1]} tokens"
                                      + (f" ({period} repeated twice)" if period else ""),
                                      "layers": {str(k): {n: x for n, x in v.items() if n == "retrieval_heads"}
                                                 for k, v in got.items() if isinstance(v, dict)}}

    def _measure(self, rec, model, device) -> None:
        n = int(rec.seq_len)
        ids = torch.randint(0, int(model.lm.config.vocab_size), (1, n), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        # A prefill computes the next-token logits of the last position only (as generation
        # does): the full (n x vocab) logits would dominate time and memory and hide the method.
        fwd = lambda: model(input_ids=ids, logits_to_keep=1)  # noqa: E731
        if getattr(model, "pressed", False):  # the prefill and the press's compression, into a new cache
            fwd = lambda: model.session(n + 1).prefill(ids)  # noqa: E731
        rec.latency_ms["prefill"] = bench.time_ms(fwd, device, self.warmup, self.repeats, self.rep_ms)
        rec.details["timer"] = rec.latency_ms["prefill"].pop("timer")
        rec.details["prefill"] = f"one forward of {n} tokens, logits of the last position only"
        rec.peak_mem_bytes["prefill"], rec.details["memory"] = bench.peak_memory_bytes(fwd, device)
        rec.metrics.update(self._index_time(model, fwd))

    @staticmethod
    def _index_time(model, fwd) -> dict:
        """{index_ms, index_share} of a prefill through a method that builds an index
        (``has_index``): one more forward under ``index_timing(True)`` (synced), the index steps of
        all layers summed; index_share = index_ms / the prefill's p50 is left to the tables. {}
        where no layer's method builds an index (or none did in that call: A-shape heads)."""
        from methods.base import index_timing

        built = [m._attnbench_method for m in model.modules() if hasattr(m, "_attnbench_method")]
        if not any(getattr(m, "has_index", False) for m in built):
            return {}
        with torch.no_grad(), index_timing(True):
            fwd()
        times = [m.last_index_ms for m in built if getattr(m, "has_index", False) and m.last_index_ms is not None]
        return {"index_ms": float(sum(times)), "index_layers": len(times)} if times else {}

    @staticmethod
    def _ran_real_kernel(model) -> bool:
        built = [m._attnbench_method for m in model.modules() if hasattr(m, "_attnbench_method")]
        return bool(built) and all(m.real_kernel for m in built)
