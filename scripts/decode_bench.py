"""Decode kernels on one GPU: the split-K dense decode kernel (methods/kernels/decode.py) and
its gather path against PyTorch SDPA (default backend, grouped-query heads without repeating
them), bf16, one query token per head.

For each batch size and cache length: the time of one decode step (median of CUDA-event
timings over repeated calls; also replayed from a CUDA graph, which removes the Python launch
cost a serving engine does not pay), the bytes of K and V it must read, the achieved GB/s and
its share of the H200's HBM bandwidth (4.8 TB/s), and the largest difference from SDPA's
output. The gather rows read ``budget`` keys per KV head at random positions of the cache (a
decode-time selection's attention step). With ``--tune`` a sweep of launch settings (keys per
tile, warps, stages, programs per SM) comes first at every shape and writes the fastest of each
to the launch table the kernel reads (``methods/kernels/decode_launch.json``); ``--profile``
lengths get the GPU time of each kernel (split-K pass, merge) at batch 1.

    python scripts/decode_bench.py --tune --out results/decode   # writes kernel_bench.{jsonl,md}
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


def _graph(fn):
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _time(fn, graph: bool, reps: int = 50) -> float:
    """Median ms of one call (CUDA events), eager or replayed from a captured CUDA graph."""
    run = _graph(fn) if graph else fn
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
    launch = decode.launch_for(D, B * Hkv, T)
    rows.append(_row("split-K decode", B, H, Hkv, T, D, T, _time(ours, False), _time(ours, True), err,
                     splits=decode.num_splits(B, Hkv, T, q.device, launch["block_n"], launch["programs_per_sm"]),
                     launch=launch))
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


GRID = [(bn, w, st, pps) for bn in (32, 64, 128) for w, st in ((4, 2), (4, 3), (8, 3)) for pps in (1, 2, 3, 4)]


def _cache(B, H, Hkv, T, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, torch.randn_like(k)


def sweep(B, H, Hkv, T, D, grid=GRID):
    """Every launch setting of ``grid`` (keys per tile, warps, stages, programs per SM) at one
    shape, graph-replayed ms, fastest first."""
    q, k, v = _cache(B, H, Hkv, T, D)
    out = []
    for block_n, warps, stages, pps in grid:
        S = decode.num_splits(B, Hkv, T, q.device, block_n, pps)
        ms = _time(lambda S=S, bn=block_n, w=warps, st=stages: decode.decode_attention(
            q, k, v, splits=S, block_n=bn, num_warps=w, num_stages=st), True)
        out.append({"B": B, "H": H, "Hkv": Hkv, "T": T, "D": D, "block_n": block_n, "num_warps": warps,
                    "num_stages": stages, "programs_per_sm": pps, "splits": S, "ms_graph": round(ms, 4),
                    "GB_s": round(2 * B * Hkv * T * D * 2 / ms / 1e6, 1)})
    return sorted(out, key=lambda r: r["ms_graph"])


def tune(shapes, table_path) -> list[dict]:
    """The sweep at each shape; the fastest setting of each becomes an entry of the launch table
    that ``decode.launch_for`` reads (written to ``table_path``). Returns every sweep row."""
    rows, entries = [], []
    for B, H, Hkv, T, D in shapes:
        swept = sweep(B, H, Hkv, T, D)
        torch.cuda.empty_cache()
        rows += swept
        best = swept[0]
        entries.append({"head_dim": D, "batch_kv": B * Hkv, "n_keys": T,
                        **{k: best[k] for k in ("block_n", "num_warps", "num_stages", "programs_per_sm",
                                                "ms_graph", "GB_s")},
                        "gpu": torch.cuda.get_device_name()})
        print(f"tune B={B} T={T} D={D}: best {best['block_n']}/{best['num_warps']}w/{best['num_stages']}s/"
              f"{best['programs_per_sm']}pps {best['ms_graph']} ms, {best['GB_s']} GB/s", flush=True)
    Path(table_path).write_text(json.dumps({"written_by": "scripts/decode_bench.py --tune (fastest of "
                                            f"{len(GRID)} settings a shape, CUDA graph, bf16)",
                                            "torch": torch.__version__, "entries": entries}, indent=1) + "\n")
    decode.launch_table.cache_clear()
    return rows


def profile(B, H, Hkv, T, D, reps=20) -> dict:
    """GPU time per kernel of one decode step through the method path (torch.profiler over
    ``reps`` graph replays): the split-K pass, the merge, and the step's replayed time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    q, k, v = _cache(B, H, Hkv, T, D)
    replay = _graph(lambda: decode.decode_attention(q, k, v))
    step_ms = _time(replay, False)  # the replay, timed as one call
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            replay()
        torch.cuda.synchronize()
    us = {}
    for e in p.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0):
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t:
                us[e.key] = round(t / reps, 2)
    launch = decode.launch_for(D, B * Hkv, T)
    nbytes = 2 * B * Hkv * T * D * 2
    return {"B": B, "H": H, "Hkv": Hkv, "T": T, "D": D, "step_ms_graph": round(step_ms, 4),
            "kernel_us": us, "launch": launch, "ideal_us_at_4.8TBs": round(nbytes / 4.8e6, 1),
            "splits": decode.num_splits(B, Hkv, T, q.device, launch["block_n"], launch["programs_per_sm"])}


def markdown(rows, tuning, profiles=()) -> str:
    cols = ["kind", "B", "H", "Hkv", "D", "T", "keys_read", "ms_eager", "ms_graph", "GB_s", "hbm_share",
            "max_abs_err_vs_sdpa"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    tcols = ["B", "Hkv", "D", "T", "block_n", "num_warps", "num_stages", "programs_per_sm", "splits", "ms_graph", "GB_s"]
    t = ["| " + " | ".join(tcols) + " |", "|" + "---|" * len(tcols)]
    shapes = {}
    for r in tuning:  # the three fastest and the slowest setting of each shape
        shapes.setdefault((r["B"], r["Hkv"], r["D"], r["T"]), []).append(r)
    for rs in shapes.values():
        rs = sorted(rs, key=lambda r: r["ms_graph"])
        t += ["| " + " | ".join(str(r[c]) for c in tcols) + " |" for r in rs[:3] + rs[-1:]]
    prof_lines = []
    for p in profiles:
        ks = "; ".join(f"{k[:60]} {v} us" for k, v in p["kernel_us"].items())
        prof_lines.append(f"- B={p['B']} T={p['T']}: step {p['step_ms_graph'] * 1000:.1f} us (graph), ideal "
                          f"{p['ideal_us_at_4.8TBs']} us at 4.8 TB/s; splits {p['splits']}; per kernel: {ks}")
    out = ["### Decode step, bf16 (ms: median of one call; GB/s from the faster of eager and graph; "
           "launch settings from the tuned table)", "", *lines, ""]
    if tuning:
        out += ["### Launch settings (CUDA graph): the three fastest and the slowest of each shape", "", *t, ""]
    if prof_lines:
        out += ["### GPU time per kernel (torch.profiler, graph replays)", "", *prof_lines, ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for kernel_bench.jsonl and kernel_bench.md")
    ap.add_argument("--lengths", default="32768,131072,524288,1048576")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--budget", type=int, default=2048, help="keys per KV head of the gather rows")
    ap.add_argument("--tune", action="store_true", help="sweep the launch settings at every shape first and "
                    "write the fastest of each to --table (the method path reads it)")
    ap.add_argument("--table", default=str(decode.LAUNCH_FILE), help="the launch table --tune writes")
    ap.add_argument("--profile", default="32768,131072", help="lengths (B=1) whose per-kernel GPU time is "
                    "profiled ('' for none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_bench needs a CUDA GPU", file=sys.stderr)
        return 1
    t0 = time.time()
    batches = list(map(int, args.batches.split(",")))
    lengths = list(map(int, args.lengths.split(",")))
    shapes = [(B, 32, 8, T, 128) for B in batches for T in lengths] + [(1, 9, 3, 8192, 64)]
    tuning = tune(shapes, args.table) if args.tune else []
    rows = []
    for B, H, Hkv, T, D in shapes:
        rows += bench(B, H, Hkv, T, D, budget=args.budget if T >= 131072 else None)
        torch.cuda.empty_cache()
    profiles = []
    for T in (int(t) for t in args.profile.split(",") if t):
        try:
            profiles.append(profile(1, 32, 8, T, 128))
        except Exception as e:  # noqa: BLE001 - the table above is kept; the profile says why it is missing
            print(f"profile at T={T} failed: {type(e).__name__}: {e}", file=sys.stderr)
    for r in rows + tuning + profiles:
        r["gpu"] = torch.cuda.get_device_name()
        r["torch"] = torch.__version__
    text = markdown(rows, tuning, profiles)
    print(text)
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernel_bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + tuning + profiles))
        (out / "kernel_bench.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
