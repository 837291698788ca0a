"""Star Attention across GPUs (methods/star_distributed.py), one process per GPU as the paper's
hosts, against the one-process emulation and dense attention on one GPU (issue 25).

    python -m torch.distributed.run --standalone --nproc_per_node=2 scripts/star_distributed_bench.py \
        --lens 8192 16384 --out results/prefill/star_multi_gpu

Each rank is one host (``num_hosts`` = the world size): the context blocks are dealt to the
ranks, phase 1 runs on each rank's blocks, phase 2's partial outputs are combined by the paper's
distributed softmax (an all-gather), and the output is all-reduced (NCCL on GPUs, gloo with
``--device cpu``). For each length, at SmolLM2-135M's head layout (9 query heads, 3 KV heads,
head dim 64; bf16 on GPUs): the distributed call's wall time (the slowest rank's, median of
``--reps`` after a warm-up), and on rank 0 alone the emulation's (``methods.star_attention``
with ``--impl``) and dense causal SDPA's; the relative error of the distributed output against
the emulation (the same computation: should be rounding) and against dense (what Star's
approximation costs). One JSON line per length in ``OUT/records.jsonl`` and a table in
``OUT/table.md``, written by rank 0.

Each rank attends through FlexAttention with its log-sum-exp (compiled on GPUs), the path the
emulation takes with ``impl=flex``: the comparison is like for like. ``--impl reference`` writes
the scores out in fp32 on both sides instead (small lengths only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from methods.star_distributed import star_attention_distributed  # noqa: E402

H, HKV, D = 9, 3, 64  # SmolLM2-135M


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, reps: int, group_max: bool) -> tuple[list[float], object]:
    """ms of each of ``reps`` calls after one warm-up (with ``group_max``: the slowest rank's,
    every rank calling together), and the warm-up's result."""
    out = fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        if group_max:
            dist.barrier()
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ms = torch.tensor([1e3 * (time.perf_counter() - t0)], dtype=torch.float64,
                          device=dev if dist.get_backend() == "nccl" else "cpu")
        if group_max:
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        times.append(float(ms))
    return times, out


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--query-len", type=int, default=64, help="the query's tokens (phase 2), at the end")
    ap.add_argument("--impl", default=None, help="the path of both (default: flex on GPUs, reference on CPUs; "
                    "the distributed side: FlexAttention unless reference)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="results/prefill/star_multi_gpu")
    a = ap.parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit("star_distributed_bench: start it with torch.distributed.run (one process per host), e.g. "
                 "python -m torch.distributed.run --standalone --nproc_per_node=2 scripts/star_distributed_bench.py")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("star_distributed_bench: no CUDA device here (--device cpu runs it on gloo)")
    backend = "nccl" if a.device == "cuda" else "gloo"
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if a.device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    impl = a.impl or ("flex" if dev.type == "cuda" else "reference")
    rows = []
    try:
        for T in a.lens:
            g = torch.Generator().manual_seed(T)  # the same inputs on every rank
            q = torch.randn(1, H, T, D, generator=g).to(dev, dtype)
            k, v = (torch.randn(1, HKV, T, D, generator=g).to(dev, dtype) for _ in range(2))
            m = methods.load("star_attention", num_heads=H, num_kv_heads=HKV, head_dim=D, num_hosts=world,
                             query_len=a.query_len, impl=impl, max_seq_len=T).to(dev)
            dist_ms, out = timed(lambda m=m, q=q, k=k, v=v: star_attention_distributed(m, q, k, v), dev, a.reps, True)
            row = {"world": world, "backend": backend, "T": T, "H": H, "Hkv": HKV, "D": D, "dtype": str(dtype),
                   "query_len": a.query_len, "split": list(m.split(T)), "reps": a.reps,
                   "distributed_ms": {"min": min(dist_ms), "median": statistics.median(dist_ms), "max": max(dist_ms)}}
            if rank == 0:
                with torch.no_grad():
                    emu_ms, emu = timed(lambda m=m, q=q, k=k, v=v: m(q, k, v, causal=True), dev, a.reps, False)
                    dense_ms, dense = timed(lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=True), dev, a.reps, False)
                row.update({
                    "emulation_impl": impl, "emulation_ms": statistics.median(emu_ms),
                    "dense_sdpa_ms": statistics.median(dense_ms),
                    "rel_err_vs_emulation": rel(out, emu), "rel_err_vs_dense": rel(out, dense),
                    "emulation_rel_err_vs_dense": rel(emu, dense),
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__})
                rows.append(row)
                print(json.dumps(row), flush=True)
            dist.barrier()
            del q, k, v, out
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if rank == 0 and rows:
            out_dir = Path(a.out)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            lines = [f"Star Attention on {world} {'GPUs' if dev.type == 'cuda' else 'processes'} ({backend}), "
                     f"H={H} Hkv={HKV} D={D}, {dtype}; ms: median of {a.reps} (distributed: the slowest rank)", "",
                     "| T | hosts | distributed ms | emulation ms (1 device) | dense SDPA ms | rel err vs emulation | "
                     "rel err vs dense |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {r['T']} | {r['world']} | {r['distributed_ms']['median']:.3f} | {r['emulation_ms']:.3f} | "
                      f"{r['dense_sdpa_ms']:.3f} | {r['rel_err_vs_emulation']:.2e} | {r['rel_err_vs_dense']:.3f} |"
                      for r in rows]
            (out_dir / "table.md").write_text("\n".join(lines) + "\n")
            print("\n".join(lines), flush=True)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
