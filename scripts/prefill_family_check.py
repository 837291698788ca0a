"""Check the issue-25 prefill methods on a GPU: every fast path (flex, triton) against the
reference at one length, with the density, recall-relevant index time and attention time.

    python scripts/prefill_family_check.py [--T 4096] [--dtype float16] [--budget-s 420] [--methods sparge,hip]

It prints a progress line (with the seconds elapsed) before each step and flushes every line:
its first result comes after the first method's reference pass and FlexAttention compiles
(one for the plain call, one more for the padded call's mask: tens of seconds each on a fresh
machine), and, stdout being a pipe there, a block-buffered print showed nothing until exit (the
two silent 45-60 s runs). Steps that would start after ``--budget-s`` seconds are skipped, and
said so, so that the run ends within a device call.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = ["s2_attention", "star_attention", "sample_attention", "sparge", "hip", "moa", "hyper_attention",
         "seer_attention"]
T0 = time.perf_counter()


def say(*parts) -> None:
    """One line, flushed, with the seconds since the start."""
    print(f"[{time.perf_counter() - T0:6.1f}s]", *parts, flush=True)


def load(name, **kw):
    """The method from its YAML without Hydra (the GPU image has no hydra-core)."""
    cfg = yaml.safe_load((ROOT / "conf" / "method" / f"{name}.yaml").read_text())
    mod, cls = cfg.pop("_target_").rsplit(".", 1)
    cfg.pop("_partial_", None)
    return getattr(importlib.import_module(mod), cls)(**{**cfg, **kw})


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) / reps * 1e3


def main(argv=None):
    from methods.base import index_timing

    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no step after this many seconds")
    ap.add_argument("--methods", default=",".join(NAMES), help="comma-separated, of " + ",".join(NAMES))
    args = ap.parse_args(argv)
    names = [n for n in args.methods.split(",") if n]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {NAMES}")
    if not torch.cuda.is_available():
        ap.error("this check runs the GPU paths: no CUDA device here")

    def over(what) -> bool:
        if time.perf_counter() - T0 > args.budget_s:
            say(f"time budget ({args.budget_s:.0f} s) reached: {what} skipped")
            return True
        return False

    dt = getattr(torch, args.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, Hkv, D, T = 1, 8, 2, 64, args.T
    q = torch.randn(B, H, T, D, device="cuda", generator=g, dtype=dt) * 2
    k = torch.randn(B, Hkv, T, D, device="cuda", generator=g, dtype=dt)
    v = torch.randn(B, Hkv, T, D, device="cuda", generator=g, dtype=dt)
    kpm = torch.ones(B, T, dtype=torch.bool, device="cuda")
    say(f"T={T} B={B} H={H} Hkv={Hkv} D={D} {args.dtype}; methods: {', '.join(names)}")
    for name in names:
        if over(name):
            continue
        say(f"{name}: build")
        extra = {"gate": "untrained"} if name == "seer_attention" else {}
        probe = load(name, num_heads=H, num_kv_heads=Hkv, head_dim=D, max_seq_len=T, **extra)
        for causal in (True, False):
            if not (probe.supports_causal if causal else probe.supports_noncausal):
                continue
            if over(f"{name} causal={causal}"):
                continue
            say(f"{name} causal={causal}: reference (fp32, dense mask)")
            ref = load(name, num_heads=H, num_kv_heads=Hkv, head_dim=D, max_seq_len=T,
                       impl="reference", **extra).cuda()
            with torch.no_grad():
                want = ref(q.float(), k.float(), v.float(), causal=causal)
            for impl in probe.impls[1:]:
                if over(f"{name} {impl} causal={causal}"):
                    continue
                say(f"{name} {impl} causal={causal}: first call (compiles), timed calls, padded call, index timing")
                m = load(name, num_heads=H, num_kv_heads=Hkv, head_dim=D, max_seq_len=T, impl=impl, **extra).cuda()
                try:
                    with torch.no_grad():
                        out, ms = timed(lambda: m(q, k, v, causal=causal))
                        padded = m(q, k, v, causal=causal, key_padding_mask=kpm)
                        with index_timing(True):  # one more call, its index step timed apart (synced)
                            m(q, k, v, causal=causal)
                except Exception as e:  # noqa: BLE001 - report and go on
                    say(f"{name:16s} {impl:6s} causal={causal!s:5s} ERROR {type(e).__name__}: {str(e)[:300]}")
                    continue
                err = (out.float() - want).abs().max().item()
                perr = (padded.float() - want).abs().max().item()
                idx = getattr(m, "last_index_ms", None)
                say(f"{name:16s} {impl:6s} causal={causal!s:5s} path={m.last_path} max_err={err:.2e} "
                    f"padded_err={perr:.2e} density={m.last_density:.3f} ref_density={ref.last_density:.3f} "
                    f"call_ms={ms:.2f} index_ms={idx if idx is None else round(idx, 2)} "
                    f"compiled={m.real_kernel}")
        if len(probe.impls) == 1:
            m = probe.cuda()
            for causal in (True, False):
                if not (m.supports_causal if causal else m.supports_noncausal) or over(f"{name} causal={causal}"):
                    continue
                say(f"{name} reference causal={causal}: timing")
                with torch.no_grad():
                    _, ms = timed(lambda: m(q, k, v, causal=causal), reps=1)
                say(f"{name:16s} reference causal={causal!s:5s} density={m.last_density:.3f} call_ms={ms:.1f}")


if __name__ == "__main__":
    main()
