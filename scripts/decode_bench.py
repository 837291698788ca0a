"""Decode kernels on one GPU: the split-K dense decode kernel (methods/kernels/decode.py) and
its gather path against PyTorch SDPA (default backend, grouped-query heads without repeating
them), bf16, one query token per head.

For each batch size and cache length: the time of one decode step (median of CUDA-event
timings over repeated calls; also replayed from a CUDA graph, which removes the Python launch
cost a serving engine does not pay), the bytes of K and V it must read, the achieved GB/s and
its share of the H200's HBM bandwidth (4.8 TB/s), and the largest difference from SDPA's
output. The gather rows read ``budget`` keys per KV head at random positions of the cache (a
decode-time selection's attention step). A short sweep of launch settings comes first at 128k.

    python scripts/decode_bench.py --out results/decode      # writes kernel_bench.{jsonl,md}
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from methods.kernels import decode  # noqa: E402

HBM_TBS = 4.8  # H200 HBM3e peak, TB/s


def _time(fn, graph: bool, reps: int = 50) -> float:
    """Median ms of one call (CUDA events), eager or replayed from a captured CUDA graph."""
    fn()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _row(kind, B, H, Hkv, T, D, read_keys, ms_eager, ms_graph, err, **extra):
    nbytes = 2 * B * Hkv * read_keys * D * 2  # K and V, bf16
    best = min(ms_eager, ms_graph)
    return {"kind": kind, "B": B, "H": H, "Hkv": Hkv, "T": T, "D": D, "keys_read": read_keys,
            "ms_eager": round(ms_eager, 4), "ms_graph": round(ms_graph, 4),
            "GB_s": round(nbytes / best / 1e6, 1), "hbm_share": round(nbytes / best / 1e9 / HBM_TBS, 3),
            "max_abs_err_vs_sdpa": err, **extra}


def bench(B, H, Hkv, T, D, budget=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    rows = []
    sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)  # noqa: E731
    ref = sdpa()[:, :, 0].float()
    ours = lambda: decode.decode_attention(q, k, v)  # noqa: E731
    err = float((ours()[0].float() - ref).abs().max())
    rows.append(_row("sdpa", B, H, Hkv, T, D, T, _time(sdpa, False), _time(sdpa, True), 0.0,
                     backend="default (cuDNN / flash as PyTorch picks)"))
    rows.append(_row("split-K decode", B, H, Hkv, T, D, T, _time(ours, False), _time(ours, True), err,
                     splits=decode.num_splits(B, Hkv, T, q.device)))
    if budget:
        idx = torch.stack([torch.randperm(T, device="cuda", generator=g)[:budget].sort().values
                           for _ in range(B * Hkv)]).view(B, Hkv, budget).to(torch.int32)
        keep = torch.zeros(B, Hkv, T, dtype=torch.bool, device="cuda")
        keep.scatter_(2, idx.long(), True)
        mask = keep.repeat_interleave(H // Hkv, 1)[:, :, None, :]
        ref_sel = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)[:, :, 0]
        gather = lambda: decode.decode_attention(q, k, v, indices=idx)  # noqa: E731
        gerr = float((gather()[0].float() - ref_sel.float()).abs().max())
        eager, graph = _time(gather, False), _time(gather, True)
        rows.append(_row(f"gather {budget} keys", B, H, Hkv, T, D, budget, eager, graph, gerr,
                         step_speedup_vs_dense_kernel=round(rows[1]["ms_graph"] / graph, 1)))
    return rows


def sweep(T=131072, B=1, H=32, Hkv=8, D=128):
    """A few launch settings at one shape (graph-replayed ms)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    out = []
    base = dict(decode.DECODE_LAUNCH)
    for block_n, warps, stages, pps in [(64, 4, 3, 4), (32, 4, 3, 4), (128, 4, 3, 4), (64, 8, 3, 4),
                                        (64, 4, 2, 4), (64, 4, 4, 4), (64, 4, 3, 2), (64, 4, 3, 8),
                                        (128, 8, 3, 4), (128, 4, 2, 8)]:
        decode.DECODE_LAUNCH.update(block_n=block_n, num_warps=warps, num_stages=stages, programs_per_sm=pps)
        ms = _time(lambda: decode.decode_attention(q, k, v), True)
        out.append({"block_n": block_n, "num_warps": warps, "num_stages": stages, "programs_per_sm": pps,
                    "ms_graph": round(ms, 4), "GB_s": round(2 * B * Hkv * T * D * 2 / ms / 1e6, 1)})
    decode.DECODE_LAUNCH.update(base)
    return out


def markdown(rows, tuning) -> str:
    cols = ["kind", "B", "H", "Hkv", "D", "T", "keys_read", "ms_eager", "ms_graph", "GB_s", "hbm_share",
            "max_abs_err_vs_sdpa"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    t = ["| block_n | num_warps | num_stages | programs_per_sm | ms_graph | GB_s |", "|---|---|---|---|---|---|"]
    t += [f"| {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['programs_per_sm']} | {r['ms_graph']} | "
          f"{r['GB_s']} |" for r in tuning]
    return "\n".join(["### Decode step, bf16 (ms: median of one call; GB/s from the faster of eager and graph)",
                      "", *lines, "", "### Launch settings at B=1, 128k, H=32, Hkv=8, D=128 (CUDA graph)", "", *t, ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for kernel_bench.jsonl and kernel_bench.md")
    ap.add_argument("--lengths", default="32768,131072,524288,1048576")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--budget", type=int, default=2048, help="keys per KV head of the gather rows")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_bench needs a CUDA GPU", file=sys.stderr)
        return 1
    t0 = time.time()
    tuning = sweep()
    rows = []
    for B in map(int, args.batches.split(",")):
        for T in map(int, args.lengths.split(",")):
            rows += bench(B, 32, 8, T, 128, budget=args.budget if T >= 131072 else None)
            torch.cuda.empty_cache()
    rows += bench(1, 9, 3, 8192, 64)  # SmolLM2-135M's layout at its context
    for r in rows:
        r["gpu"] = torch.cuda.get_device_name()
        r["torch"] = torch.__version__
    text = markdown(rows, tuning)
    print(text)
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernel_bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + tuning))
        (out / "kernel_bench.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
