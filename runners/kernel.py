"""runner=kernel: the attention operation alone on random q/k/v, one record per length.

For each sequence length: correctness gate (fast path vs reference, small shape), fidelity
metrics against exact attention, cost, then latency (forward; backward when the method is
trainable) and peak memory. Every length writes its record as soon as it is measured, so a
later failure never loses a finished result.
"""
from __future__ import annotations

import copy
import gc
import logging

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from methods.base import check_finite
from runners import bench, records
from runners.context import base_record, build_method, method_name, resolve_device, resolve_dtype
from tasks import fidelity

log = logging.getLogger(__name__)
GATE_TOL = {torch.float64: 1e-6, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _gate(method, cfg, shape, device, dtype, causal) -> dict:
    """Compare the running implementation with the method's reference on a small shape."""
    if method.impl == "reference":
        return {"checked": False, "passed": True, "max_rel_err": None, "against": "is the reference"}
    B, H, Hkv, D = shape
    n = int(cfg.runner.gate_len)
    q, k, v = fidelity.random_qkv(B, H, Hkv, n, D, device, dtype, int(cfg.seed) + 7)
    ref = copy.deepcopy(method)
    ref.impl = "reference"
    with torch.no_grad():
        err = fidelity.max_rel_err(method(q, k, v, causal=causal), ref(q, k, v, causal=causal))
    tol = GATE_TOL[dtype]
    return {"checked": True, "passed": bool(err <= tol), "max_rel_err": err, "tol": tol, "len": n}


def _measure(rec, method, cfg, shape, T, device, dtype, causal, backward) -> None:
    B, H, Hkv, D = shape
    q, k, v = fidelity.random_qkv(B, H, Hkv, T, D, device, dtype, int(cfg.seed) + T)
    check_finite(q=q, k=k, v=v)
    rec.details.update(method.describe(q, k, v, causal))

    rec.correctness = _gate(method, cfg, shape, device, dtype, causal)
    if not rec.correctness["passed"]:
        rec.status = "failed_correctness"
        rec.error = f"fast path differs from reference: max_rel_err={rec.correctness['max_rel_err']:.3g}"
        return

    rec.metrics.update(
        fidelity.evaluate(method, cfg.task, B, H, Hkv, T, D, device, dtype, int(cfg.seed), causal)
    )
    rec.cost = method.cost(T, T, causal).asdict()
    with torch.no_grad():
        method(q, k, v, causal=causal)
    if method.last_density is not None:  # data-dependent sparsity, counted from its index sets
        rec.metrics["density_measured"] = method.last_density

    r = cfg.runner
    with torch.no_grad():
        fwd = lambda: method(q, k, v, causal=causal)  # noqa: E731
        rec.latency_ms["forward"] = bench.time_ms(fwd, device, r.warmup, r.repeats, r.rep_ms)
        rec.peak_mem_bytes["forward"], how = bench.peak_memory_bytes(fwd, device)
    rec.details["memory"] = how
    rec.details["timer"] = rec.latency_ms["forward"].pop("timer")

    if backward:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = method(qg, kg, vg, causal=causal)
        grad = torch.randn_like(out)
        bwd = lambda: out.backward(grad, retain_graph=True)  # noqa: E731
        rec.latency_ms["backward"] = bench.time_ms(bwd, device, r.warmup, r.repeats, r.rep_ms)
        rec.latency_ms["backward"].pop("timer")
        del out

        def step():
            o = method(qg, kg, vg, causal=causal)
            o.backward(grad)

        rec.peak_mem_bytes["forward_backward"], _ = bench.peak_memory_bytes(step, device)


def _no_donated_buffers():
    import contextlib

    import torch._functorch.config as cfg  # (not imported by `import torch` on every version)
    return cfg.patch(donated_buffer=False) if hasattr(cfg, "donated_buffer") else contextlib.nullcontext()


def run(cfg: DictConfig) -> list[records.RunRecord]:
    if cfg.task.name != "fidelity":
        raise ValueError(f"runner=kernel measures the attention operation with task=fidelity, "
                         f"not task={cfg.task.name}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(int(cfg.runner.cpu_threads))
    m = cfg.model
    B, H, D = int(m.batch_size), int(m.num_heads), int(m.head_dim)
    Hkv = int(m.get("num_kv_heads") or H)
    causal = bool(cfg.runner.causal)
    seq_lens = [int(t) for t in cfg.runner.seq_lens]
    done = set() if cfg.runner.force else records.done_ids(cfg.store)

    out: list[records.RunRecord] = []
    try:
        method = build_method(cfg, num_heads=H, head_dim=D, num_kv_heads=Hkv,
                              max_seq_len=max(*seq_lens, int(cfg.runner.gate_len))).to(device).eval()
    except Exception as exc:  # noqa: BLE001 - a bad config is a record, not a crashed sweep
        err = f"{type(exc).__name__}: {exc}"
        log.error("could not build the method: %s", err)
        for T in seq_lens:  # one per length, so that tables show the failure where results would be
            out.append(base_record(cfg, device, dtype, seq_len=T, causal=causal, status="error", error=err))
            records.append(cfg.store, out[-1])
        return out

    if not (method.supports_causal if causal else method.supports_noncausal):
        log.info("%s does not support causal=%s: nothing to run", method_name(cfg), causal)
        return out  # a sweep over both settings runs each method where it applies
    backward = method.trainable if cfg.runner.backward == "auto" else bool(cfg.runner.backward)
    bar = tqdm(seq_lens, desc=f"{method_name(cfg)}", unit="len", leave=False)
    for T in bar:
        bar.set_postfix(T=T)
        rec = base_record(cfg, device, dtype, seq_len=T, causal=causal,
                          real_kernel=method.real_kernel)
        if rec.run_id in done:
            log.info("T=%d: an ok record with run_id %s exists; skipped", T, rec.run_id)
            continue
        try:
            # the backward is timed on one retained graph: compiled FlexAttention donates its
            # buffers to a backward that runs once unless told not to, from its first compile
            with _no_donated_buffers():
                _measure(rec, method, cfg, (B, H, Hkv, D), T, device, dtype, causal, backward)
        except Exception as exc:  # noqa: BLE001 - recorded, and the sweep goes on
            rec.status = "oom" if bench.is_oom(exc) else "error"
            rec.error = f"{type(exc).__name__}: {exc}"
            log.warning("T=%d: %s", T, rec.error)
        rec.real_kernel = method.real_kernel  # known once the implementation has run
        records.append(cfg.store, rec)
        out.append(rec)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out

