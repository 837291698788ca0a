"""Where a method's forward spends its GPU time: one kernel per line, from torch.profiler.

    python scripts/profile_method.py nsa --seq-len 65536 --heads 64 --kv-heads 4 impl=triton
    python scripts/profile_method.py performer --seq-len 65536 impl=triton num_features=128
    python scripts/profile_method.py nsa --seq-len 65536 --heads 64 --kv-heads 4 impl=triton --backward

Builds the method with ``methods.load`` (extra ``key=value`` arguments are its
hyperparameters; numbers and booleans are parsed), runs the causal forward in bf16 on random
inputs (B=1) twice to warm up (``--backward``: forward and backward, a training step), then
profiles ``--reps`` calls and prints the CUDA kernels by
total time (per call), with the share of the whole. A diagnosis tool for the efficiency
notes: latencies that are reported come from ``runners.cli`` and ``scripts/peers.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method")
    ap.add_argument("overrides", nargs="*", help="hyperparameters, key=value")
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--backward", action="store_true", help="profile a training step: forward and backward "
                    "(gradients of q, k, v and the method's parameters)")
    args = ap.parse_intermixed_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("scripts/profile_method.py profiles CUDA kernels: no CUDA device here")
    kw = {}
    for item in args.overrides:
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not key=value")
        kw[key] = _value(val)
    H, Hkv, D, T = args.heads, args.kv_heads or args.heads, args.head_dim, args.seq_len
    m = methods.load(args.method, num_heads=H, num_kv_heads=Hkv, head_dim=D, max_seq_len=T, **kw)
    m = m.cuda().to(torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, Hkv, T, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    if args.backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        grad = torch.randn(q.shape, device="cuda", generator=g, dtype=torch.bfloat16)

        def call():
            m(q, k, v, causal=True).backward(grad)
    else:
        def call():
            with torch.no_grad():
                m(q, k, v, causal=True)
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.reps):
            call()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if not str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue  # operators: their kernels are counted on their own lines
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append((us / args.reps / 1e3, e.count // args.reps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    step = "forward + backward" if args.backward else "forward"
    print(f"{args.method} {kw} T={T} H={H} Hkv={Hkv} D={D}: {total:.2f} ms of GPU kernels per {step}")
    print("| ms per call | share | calls | kernel |\n|---|---|---|---|")
    for ms, n, name in rows[: args.top]:
        print(f"| {ms:.3f} | {ms / total:.0%} | {n} | {name[:90]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
