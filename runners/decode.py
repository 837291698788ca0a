"""runner=decode: the decode phase of the attention operation (model=attn_op), one record per
prefill length L:

  inputs   q, k, v of L + steps tokens from the fidelity task: ``random`` (N(0, 1)) or
           ``structured`` (each query's ``num_dominant`` keys stand ``dominance`` above the
           rest: the task's peakedness, recorded)
  fidelity the method's decode path (``methods.decode.decode_path``) prefills L tokens through
           its own prefill, then takes ``steps`` decode steps; each step's output is compared
           with dense decode over the full history (the same K/V: relative error) and the
           share of dense attention's probability mass on the keys the step read (recall);
           a method's own per-step numbers (``last_step["stats"]``) are recorded beside them
  timing   the same again on a fresh cache, each step's three phases timed apart (synchronised):
           append (K/V write and index update) + select = index time, attend = attention time;
           per-step p20/p50/p80/p99 over the steps, after ``warmup`` steps on a copy of the cache;
           the peak memory of the decode loop; the bytes each step read; the cache's bytes held
           after the prefill (on CUDA also the allocator's count of them) and at the end; on CUDA
           also ``decode_step_graph``: select + attend of the last step replayed from a CUDA
           graph (``graph_ms``: the device time without Python's launch cost, which at one token
           per step is most of an eager step), or in ``details.graph`` why it could not be
           captured (a path that synchronises with the host)
  calibration  a path that needs offline statistics (``needs_calibration``: Loki, Double
           Sparsity) is calibrated first on other inputs of the same kind (L + steps tokens,
           seed + L + CALIBRATION_SEED), recorded in ``details.calibration``
  budget   a path that reports a per-step budget (``last_step["budget"]``: Twilight's top-p)
           has it recorded per step (``details.per_step.budget``, ``metrics.budget_mean``)
  presses  a KV-cache press (``methods.press``) compresses the cache inside its prefill; its
           ratio and kept tokens are recorded (``details.press``); the decode steps come after
           the compression (the query-agnostic setting)

Methods without a decode path of their own decode densely: ``details.decode_fallback`` is
"dense" (``methods.decode``). Decode is causal: methods that are not are skipped.
"""
from __future__ import annotations

import copy
import gc
import logging
import time
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from methods.base import check_finite
from methods.decode import decode_path, dense_decode_reference
from runners import bench, records
from runners.device import resolve_device, resolve_dtype
from tasks.fidelity import Fidelity, errors, random_qkv, structured_qkv

log = logging.getLogger(__name__)
INPUTS = ("random", "structured")
QUANTILES = (0.2, 0.5, 0.8, 0.99)
PREFILL_CHECK_ROWS = 1024  # the prefill's last rows checked against exact attention (memory: rows x L)
CALIBRATION_SEED = 1_000_003  # calibration inputs: seed + L + this (not the measured inputs)


def exact_last_rows(q, k, v, rows: int, chunk: int = 256) -> torch.Tensor:
    """Exact causal attention (fp32) of the last ``rows`` queries of q [B, H, L, D] over k, v
    [B, Hkv, L, D], ``chunk`` query rows at a time: memory rows-chunk x L, not L x L (an exact
    check of a 128k prefill as one matrix would need terabytes)."""
    B, H, L, D = q.shape
    rep = H // k.shape[1]
    kf, vf = (x.float().repeat_interleave(rep, 1) for x in (k, v))
    out = []
    for a in range(L - rows, L, chunk):
        b = min(a + chunk, L)
        s = (q[:, :, a:b].float() @ kf.transpose(-1, -2)) / D ** 0.5  # [B, H, b - a, L]
        pos = torch.arange(a, b, device=q.device).view(-1, 1)
        s = s.masked_fill(torch.arange(L, device=q.device).view(1, -1) > pos, float("-inf"))
        out.append(torch.softmax(s, -1) @ vf)
    return torch.cat(out, 2)


@dataclass
class DecodeRunner:
    """conf/runner/decode.yaml."""

    seq_lens: list[int]  # prefill lengths
    steps: int
    inputs: str
    warmup: int
    cpu_threads: int
    force: bool

    def run(self, cfg: DictConfig) -> list[records.RunRecord]:
        task = instantiate(cfg.task)
        if not isinstance(task, Fidelity):
            raise ValueError(f"runner=decode draws its inputs from task=fidelity, "
                             f"not task={records.names(cfg)['task']}")
        if self.inputs not in INPUTS:
            raise ValueError(f"runner.inputs must be one of {list(INPUTS)}, got {self.inputs!r}")
        if int(self.steps) < 1 or any(int(t) < 1 for t in self.seq_lens):
            raise ValueError(f"runner.steps and runner.seq_lens must be >= 1, got {self.steps}, {self.seq_lens}")
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        if device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        seq_lens = [int(t) for t in self.seq_lens]
        done = set() if self.force else records.done_ids(cfg.store)
        out: list[records.RunRecord] = []
        try:
            op = instantiate(cfg.model, method=cfg.method, max_seq_len=max(seq_lens) + int(self.steps),
                             _recursive_=False).to(device).eval()
        except Exception as exc:  # noqa: BLE001 - a bad config is a record, not a crashed sweep
            for T in seq_lens:
                out.append(records.new(cfg, device, dtype, seq_len=T, causal=True))
                records.fail(out[-1], exc)
                records.append(cfg.store, out[-1])
            log.error("could not build the method: %s", out[-1].error)
            return out
        method, name = op.method, records.names(cfg)["method"]
        if not method.supports_causal:
            log.info("%s is not causal: it has no decode phase", name)
            return out
        path = decode_path(method)
        for L in seq_lens:
            rec = records.new(cfg, device, dtype, seq_len=L, causal=True, real_kernel=True)
            if rec.run_id in done:
                log.info("L=%d: an ok record with run_id %s exists; skipped", L, rec.run_id)
                continue
            decoded = "dense (fallback: no decode path)" if path.decode_fallback == "dense" else type(path).__name__
            rec.details["phases"] = {"prefill": f"{name} (its own causal prefill)", "decode": decoded}
            rec.details.update({"decode_path": type(path).__name__, "decode_fallback": path.decode_fallback,
                                "steps": int(self.steps), "inputs": self.inputs, "warmup": int(self.warmup),
                                "real_kernel": "decode gathers (or keeps) only the keys it reads"})
            rec.details["peakedness"] = None if self.inputs == "random" else {
                "num_dominant": int(task.cfg.num_dominant), "dominance": float(task.cfg.dominance)}
            try:
                with torch.no_grad():
                    self._measure(rec, path, method, task, op.shape, L, device, dtype, int(cfg.seed))
            except Exception as exc:  # noqa: BLE001 - recorded, and the sweep goes on
                records.fail(rec, exc)
                log.warning("L=%d: %s", L, rec.error)
            records.append(cfg.store, rec)
            out.append(rec)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return out

    def inputs_for(self, task, shape, total: int, device, dtype, seed: int):
        B, H, Hkv, D = shape
        if self.inputs == "random":
            return random_qkv(B, H, Hkv, total, D, device, dtype, seed)
        return structured_qkv(B, H, Hkv, total, D, device, dtype, seed, True,
                              int(task.cfg.num_dominant), float(task.cfg.dominance))

    def _measure(self, rec, path, method, task, shape, L, device, dtype, seed) -> None:
        N, B = int(self.steps), shape[0]
        q, k, v = self.inputs_for(task, shape, L + N, device, dtype, seed + L)
        check_finite(q=q, k=k, v=v)
        tok = lambda t, i: t[:, :, i:i + 1]  # noqa: E731

        if getattr(path, "needs_calibration", False):  # offline statistics, from other inputs
            cs = seed + L + CALIBRATION_SEED
            cq, ck, cv = self.inputs_for(task, shape, L + N, device, dtype, cs)
            if hasattr(path, "calibrate_layer"):  # a press (methods.press): q, k, v of one layer
                path.calibrate_layer(cq, ck, cv)
            else:  # a decode path (methods.decode): (q, k) samples
                path.calibrate([(cq, ck)])
            rec.details["calibration"] = {"seed": cs, "tokens": L + N, "inputs": self.inputs}
            del cq, ck, cv

        # ---- fidelity: every step against dense decode over the full history --------------
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        cache = path.new_cache(B, L + N, dtype, device)
        pre = path.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
        if before is not None:  # the allocator's count of what the cache holds (blocks of 512 bytes)
            rec.metrics["kv_bytes_allocated_prefill"] = (torch.cuda.memory_allocated(device) - before
                                                         - pre.numel() * pre.element_size())
        R = min(L, PREFILL_CHECK_ROWS)  # the prefill's last R rows against exact attention
        rec.metrics["prefill_rel_err"] = errors(pre[:, :, L - R:], exact_last_rows(q[:, :, :L], k[:, :, :L],
                                                                                  v[:, :, :L], R))["rel_err"]
        rec.details["prefill_check_rows"] = R
        rec.metrics["kv_bytes_held_prefill"] = cache.bytes_held()
        if hasattr(path, "press_details"):  # a KV-cache press (methods.press): compressed after the prefill
            rec.details["press"] = path.press_details()
        rel, recall, read, clamped, budget, stats = [], [], [], 0, [], {}
        for i in range(L, L + N):
            o = path.decode(tok(q, i), tok(k, i), tok(v, i), cache)
            ref, p = dense_decode_reference(tok(q, i), k[:, :, :i + 1], v[:, :, :i + 1])  # p [B, H, i + 1]
            rel.append(errors(o, ref)["rel_err"])
            recall.append(_recall(p, path.last_step["positions"], cache))
            read.append(path.last_step["bytes_read"])
            clamped += path.last_step["clamped"]
            if path.last_step.get("budget") is not None:
                budget.append(float(path.last_step["budget"]))
            for n, x in (path.last_step.get("stats") or {}).items():  # a method's own (RetrievalAttention's recall)
                stats.setdefault(n, []).append(float(x))
        dense_read = [2.0 * B * shape[2] * (i + 1) * shape[3] * q.element_size() for i in range(L, L + N)]
        no_keys = any(r is None for r in recall)  # a recurrent state: no key is read, recall is undefined
        rec.metrics.update({
            "decode_rel_err_mean": _mean(rel), "decode_rel_err_max": max(rel),
            "decode_recall_mean": None if no_keys else _mean(recall),
            "decode_recall_min": None if no_keys else min(recall),
            "bytes_read_per_step": _mean(read), "dense_bytes_read_per_step": _mean(dense_read),
            "read_fraction": _mean(read) / _mean(dense_read),
            "kv_bytes_held_end": cache.bytes_held(),
            "dense_kv_bytes_end": 2.0 * B * shape[2] * (L + N) * shape[3] * q.element_size(),
            "budget_clamped_steps": clamped,
        })
        rec.metrics.update({f"decode_{n}_mean": _mean(xs) for n, xs in stats.items()})
        rec.details["per_step"] = {"rel_err": rel, "recall": recall, "bytes_read": read, **stats}
        if budget:  # keys read per query head, chosen per step (Twilight's top-p)
            rec.details["per_step"]["budget"] = budget
            rec.metrics["budget_mean"] = _mean(budget)
        del cache

        # ---- timing: a fresh cache, phases apart -------------------------------------------
        cache = path.new_cache(B, L + N, dtype, device)
        bench.sync(device)
        t0 = time.perf_counter()
        path.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
        bench.sync(device)
        rec.latency_ms["prefill"] = {"p50": (time.perf_counter() - t0) * 1e3, "samples": 1}
        warm = copy.deepcopy(cache)
        for i in range(L, L + min(int(self.warmup), N)):
            path.decode(tok(q, i), tok(k, i), tok(v, i), warm)
        del warm
        phases = {"append": [], "select": [], "attend": []}

        def loop():
            for i in range(L, L + N):
                t = [time.perf_counter()]
                path.append(cache, tok(k, i), tok(v, i))
                bench.sync(device)
                t.append(time.perf_counter())
                sel = path.select(tok(q, i), cache)
                bench.sync(device)
                t.append(time.perf_counter())
                path.attend_selected(tok(q, i), cache, sel)
                bench.sync(device)
                t.append(time.perf_counter())
                for n, (a, b) in zip(phases, zip(t, t[1:]), strict=True):
                    phases[n].append((b - a) * 1e3)

        rec.peak_mem_bytes["decode"], rec.details["memory"] = bench.peak_memory_bytes(loop, device)
        index = [a + s for a, s in zip(phases["append"], phases["select"], strict=True)]
        total = [x + a for x, a in zip(index, phases["attend"], strict=True)]
        rec.latency_ms.update({"decode_step": _quantiles(total), "decode_index": _quantiles(index),
                               "decode_attention": _quantiles(phases["attend"]),
                               "decode_append": _quantiles(phases["append"]),
                               "decode_select": _quantiles(phases["select"])})
        rec.details["timer"] = "perf_counter, synchronised after each phase"
        if device.type == "cuda":  # the device time of a step, without Python's launch cost
            i = L + N - 1
            try:
                ms = graph_ms(lambda: path.attend_selected(tok(q, i), cache, path.select(tok(q, i), cache)), device)
                rec.latency_ms["decode_step_graph"] = _quantiles(ms)
                rec.details["graph"] = (f"select + attend of the last step (cache of {L + N} tokens) replayed from a "
                                        f"CUDA graph, {GRAPH_REPLAYS} replays per sample; append not included")
            except Exception as exc:  # noqa: BLE001 - a path that synchronises cannot be captured: said so
                rec.details["graph"] = f"not captured: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        rec.cost = method.cost(L, L, True).asdict()


GRAPH_REPLAYS = 20


def graph_ms(fn, device, replays: int = GRAPH_REPLAYS, samples: int = 5) -> list[float]:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph (each sample the mean of
    ``replays`` replays between CUDA events): the device's time for the work, without the Python
    and launch cost of eager calls. ``fn`` runs once first with host synchronisation refused
    (``torch.cuda.set_sync_debug_mode``: a step that synchronises cannot be captured, and raises
    here before any capture), on a side stream (Triton's compilation, library workspaces)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize(device)
    out = []
    for _ in range(samples):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            graph.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / replays)
    del graph
    return out


def _recall(p: torch.Tensor, positions: torch.Tensor | None, cache) -> float:
    """Share of dense probability mass ``p`` [B, H, S] on the positions read ([B, H, n], -1
    padding; None: every key the cache holds), averaged over batch and heads; None where the
    cache holds no key (a recurrent state: ``methods.recurrent_decode``)."""
    if positions is None and cache.length == 0:
        return None
    if positions is None:
        held = cache.positions()
        return float(p[:, :, held].sum(-1).mean())
    mass = p.gather(-1, positions.clamp_min(0)) * (positions >= 0)
    return float(mass.sum(-1).mean())


def _mean(xs) -> float:
    return float(sum(xs) / len(xs))


def _quantiles(samples: list[float]) -> dict:
    t = torch.tensor(samples, dtype=torch.float64)
    qs = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {"p20": qs[0], "p50": qs[1], "p80": qs[2], "p99": qs[3]}
