"""runner=kernel: the attention operation alone (model=attn_op) on the fidelity task's inputs,
one record per sequence length, each in one pass:

  build    the method at the model's shape, the task (its inputs: random q, k, v), the record
  check    the running implementation against the method's reference on a small shape; a
           failure is the record's status, and nothing is timed
  measure  fidelity metrics against exact attention, cost, latency (forward; backward when the
           method is trainable: warm-up and repetition counts, p20/p50/p80, min/median/max),
           the configuration that ran (``details.kernel_config``: path, tiles) and peak memory; for a method that builds an index
           (``has_index``), one more untimed call under ``index_timing(True)`` gives its index
           step's wall time: ``metrics.index_ms`` and ``metrics.attention_ms`` = forward p50 -
           index_ms (the timed repeats run without the index timing's syncs)
  record   appended to the store as soon as the length is measured, so that a later failure
           never loses a finished result

With ``runner.target_density`` set, each length first fits the method's budget knob to that
density on its timed inputs (``methods.budget.fit_density``); everything is then measured at
that budget, and the record carries ``metrics.target_density``, ``metrics.density_achieved``
and ``details.budget`` (the knob, its value, the search's calls). A method without a knob runs as
configured (``details.budget`` says so) with its density as achieved.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import logging
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from methods.base import check_finite, index_timing
from runners import bench, records
from runners.device import resolve_device, resolve_dtype
from tasks.fidelity import Fidelity, max_rel_err

log = logging.getLogger(__name__)
GATE_TOL = {torch.float64: 1e-6, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass
class KernelRunner:
    """conf/runner/kernel.yaml."""

    seq_lens: list[int]
    causal: bool
    backward: str | bool  # auto: when the method is trainable
    warmup: int
    repeats: int
    rep_ms: int
    cpu_threads: int
    gate_len: int
    force: bool
    # equal-budget runs (``+runner.target_density=0.1``, or experiment=efficiency/equal_budget):
    # the method's budget knob is fitted per length on the timed inputs (methods.budget); not in
    # conf/runner/kernel.yaml, so that the run_ids of the other runs stay as they were
    target_density: float | None = None
    # attention recall at every length (``+runner.recall_rows=1024``): on the fidelity task's
    # structured inputs at that length, averaged over this many query rows spread over the
    # sequence (``tasks.recall.sampled_recall``: no [T, T] map); not in the YAML, as above
    recall_rows: int | None = None

    def run(self, cfg: DictConfig) -> list[records.RunRecord]:
        task = instantiate(cfg.task)
        if not isinstance(task, Fidelity):
            raise ValueError(f"runner=kernel measures the attention operation with task=fidelity, "
                             f"not task={records.names(cfg)['task']}")
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        if device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        seq_lens = [int(t) for t in self.seq_lens]
        done = set() if self.force else records.done_ids(cfg.store)
        out: list[records.RunRecord] = []
        try:
            op = instantiate(cfg.model, method=cfg.method, max_seq_len=max(*seq_lens, self.gate_len),
                             _recursive_=False).to(device).eval()
        except Exception as exc:  # noqa: BLE001 - a bad config is a record, not a crashed sweep
            for T in seq_lens:  # one per length, so that tables show the failure where results would be
                out.append(records.new(cfg, device, dtype, seq_len=T, causal=self.causal))
                records.fail(out[-1], exc)
                records.append(cfg.store, out[-1])
            log.error("could not build the method: %s", out[-1].error)
            return out

        method, name = op.method, records.names(cfg)["method"]
        if not (method.supports_causal if self.causal else method.supports_noncausal):
            log.info("%s does not support causal=%s: nothing to run", name, self.causal)
            return out  # a sweep over both settings runs each method where it applies
        backward = method.trainable if self.backward == "auto" else bool(self.backward)
        bar = tqdm(seq_lens, desc=name, unit="len", leave=False)
        for T in bar:
            bar.set_postfix(T=T)
            rec = records.new(cfg, device, dtype, seq_len=T, causal=self.causal,
                              real_kernel=method.real_kernel)
            if rec.run_id in done:
                log.info("T=%d: an ok record with run_id %s exists; skipped", T, rec.run_id)
                continue
            with records.claim(cfg.store, rec.run_id) as mine:
                if not mine:
                    log.info("T=%d: run_id %s is being run by another process; skipped", T, rec.run_id)
                    continue
                if not self.force and rec.run_id in records.done_ids(cfg.store):
                    log.info("T=%d: run_id %s was finished by another process; skipped", T, rec.run_id)
                    continue
                measured = None
                try:
                    # the backward is timed on one retained graph: compiled FlexAttention donates its
                    # buffers to a backward that runs once unless told not to, from its first compile
                    with _no_donated_buffers():
                        measured = self._check_and_measure(rec, method, task, op.shape, T, device, dtype,
                                                           int(cfg.seed), backward)
                except Exception as exc:  # noqa: BLE001 - recorded, and the sweep goes on
                    records.fail(rec, exc)
                    log.warning("T=%d: %s", T, rec.error)
                rec.real_kernel = (method if measured is None else measured).real_kernel  # known once the implementation has run
                records.append(cfg.store, rec)
            out.append(rec)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return out

    def _check_and_measure(self, rec, method, task, shape, T, device, dtype, seed, backward):
        causal = self.causal
        q, k, v = task.inputs(shape, T, device, dtype, seed + T)
        check_finite(q=q, k=k, v=v)
        if self.target_density is not None:
            method = self._at_budget(rec, method, q, k, v)
        rec.details.update(method.describe(q, k, v, causal))

        rec.correctness = self._check(method, task, shape, device, dtype, seed)
        if not rec.correctness["passed"]:
            rec.status = "failed_correctness"
            rec.error = f"fast path differs from reference: max_rel_err={rec.correctness['max_rel_err']:.3g}"
            return

        rec.metrics.update(task.evaluate(method, shape, T, device, dtype, seed, causal))
        rec.cost = method.cost(T, T, causal).asdict()
        with torch.no_grad():
            method(q, k, v, causal=causal)
        # the configuration that ran (path, tiles, launch settings; None where the method keeps none)
        rec.details["kernel_config"] = copy.deepcopy(getattr(method, "last_kernel_config", None))
        if method.last_density is not None:  # data-dependent sparsity, counted from its index sets
            rec.metrics["density_measured"] = method.last_density
        if self.target_density is not None:
            rec.metrics["target_density"] = float(self.target_density)
            rec.metrics["density_achieved"] = (method.last_density if method.last_density is not None
                                               else rec.cost["density"])

        if self.recall_rows:
            self._recall(rec, method, task, shape, T, device, dtype, seed)
        self._hardness(rec, method, q, k, T)

        with torch.no_grad():
            fwd = lambda: method(q, k, v, causal=causal)  # noqa: E731
            rec.latency_ms["forward"] = bench.time_ms(fwd, device, self.warmup, self.repeats, self.rep_ms)
            rec.peak_mem_bytes["forward"], how = bench.peak_memory_bytes(fwd, device)
        rec.details["memory"] = how
        rec.details["timer"] = rec.latency_ms["forward"].pop("timer")
        rec.metrics.update(index_split(method, q, k, v, causal, rec.latency_ms["forward"]["p50"]))

        if backward:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            out = method(qg, kg, vg, causal=causal)
            grad = torch.randn_like(out)
            bwd = lambda: out.backward(grad, retain_graph=True)  # noqa: E731
            rec.latency_ms["backward"] = bench.time_ms(bwd, device, self.warmup, self.repeats, self.rep_ms)
            rec.latency_ms["backward"].pop("timer")
            del out

            def step():
                o = method(qg, kg, vg, causal=causal)
                o.backward(grad)

            rec.peak_mem_bytes["forward_backward"], _ = bench.peak_memory_bytes(step, device)
        return method  # the method measured (at the fitted budget in an equal-budget run)

    HARDNESS_MAX_LEN = 16384  # the hardness parameters are exact and quadratic (a [T, T] map per head)

    def _hardness(self, rec, method, q, k, T: int) -> None:
        """A method's own diagnostic of its inputs, where it defines one (HyperAttention's alpha
        and kappa, ``hardness(q, k)``): ``metrics.hardness_<name>`` on the timed inputs, up to
        HARDNESS_MAX_LEN tokens (above: ``details.hardness`` says it was not computed)."""
        fn = getattr(method, "hardness", None)
        if not callable(fn):
            return
        if T > self.HARDNESS_MAX_LEN:
            rec.details["hardness"] = f"not computed above {self.HARDNESS_MAX_LEN} tokens (exact, quadratic)"
            return
        try:
            with torch.no_grad():
                rec.metrics.update({f"hardness_{n}": float(v) for n, v in fn(q, k).items()})
            rec.details["hardness"] = f"{type(method).__name__}.hardness on the timed q, k ({T} tokens)"
        except torch.cuda.OutOfMemoryError as exc:
            rec.details["hardness"] = f"failed ({type(exc).__name__})"

    def _recall(self, rec, method, task, shape, T, device, dtype, seed) -> None:
        """metrics.recall, recall_min and recall_density on structured inputs of length T (rows
        sampled: ``recall_rows``); a failure (memory) is noted in details.recall, the timing goes on."""
        from tasks.fidelity import structured_qkv
        from tasks.recall import sampled_recall

        B, H, Hkv, D = shape
        t = task.cfg
        how = (f"structured inputs (tasks.fidelity: {int(t.num_dominant)} dominant keys per query, "
               f"dominance {float(t.dominance)}), {T} tokens, {min(int(self.recall_rows), T)} query rows sampled")
        try:
            q, k, _ = structured_qkv(B, H, Hkv, T, D, device, dtype, seed + T, self.causal,
                                     int(t.num_dominant), float(t.dominance))
            r = sampled_recall(method, q, k, self.causal, rows=int(self.recall_rows))
        except Exception as exc:  # noqa: BLE001 - recall is extra: the record keeps its timing
            rec.details["recall"] = f"{how}: failed ({type(exc).__name__}: {str(exc)[:200]})"
            return
        finally:
            gc.collect()
        if r is None:
            rec.details["recall"] = f"{how}: not available (the method chooses no keys, or only through a [T, T] map)"
            return
        rec.details["recall"] = how
        rec.metrics.update({"recall": r["recall"], "recall_min": r["recall_min"], "recall_density": r["density"]})

    def _at_budget(self, rec, method, q, k, v):
        """The method with its budget knob fitted to ``target_density`` on q, k, v (or as it is,
        where it has no knob)."""
        from methods import budget

        if budget.knob(method) is None:
            rec.details["budget"] = "no budget knob: run as configured"
            return method
        fit = budget.fit_density(method, q, k, v, self.causal, float(self.target_density))
        rec.details["budget"] = fit.record()
        return fit.method

    def _check(self, method, task, shape, device, dtype, seed) -> dict:
        """The running implementation against the method's reference at ``gate_len`` tokens."""
        if method.impl == "reference":
            return {"checked": False, "passed": True, "max_rel_err": None, "against": "is the reference"}
        q, k, v = task.inputs(shape, self.gate_len, device, dtype, seed + 7)
        ref = copy.deepcopy(method)
        ref.impl = "reference"
        with torch.no_grad():
            err = max_rel_err(method(q, k, v, causal=self.causal), ref(q, k, v, causal=self.causal))
        tol = GATE_TOL[dtype]
        return {"checked": True, "passed": bool(err <= tol), "max_rel_err": err, "tol": tol,
                "len": self.gate_len}


def index_split(method, q, k, v, causal, forward_ms: float) -> dict:
    """{index_ms, attention_ms} of a method that builds an index (``has_index``): one call, after
    the timed repeats, with its index step timed (synced, ``index_timing``); attention_ms is the
    forward latency less the index time (the timed calls did not sync). {} for other methods, or
    where the call built no index (A-shape heads)."""
    if not getattr(method, "has_index", False):
        return {}
    with torch.no_grad(), index_timing(True):
        method(q, k, v, causal=causal)
    ms = method.last_index_ms
    if ms is None:
        return {}
    return {"index_ms": float(ms), "attention_ms": float(forward_ms) - float(ms)}


def _no_donated_buffers():
    import torch._functorch.config as cfg  # (not imported by `import torch` on every version)
    return cfg.patch(donated_buffer=False) if hasattr(cfg, "donated_buffer") else contextlib.nullcontext()
