"""Throughput of the block-sparse kernel on the H200 by tile shape and launch settings, and the
tile table the method path reads (``methods/kernels/tiles.json``, ``block_sparse.tiles_for``).

    python scripts/tune_block_sparse.py [--lens 16384 32768 65536] [--head-dims 64 128]
        [--out F.jsonl] [--table methods/kernels/tiles.json]
    python scripts/tune_block_sparse.py --from-jsonl results/efficiency/kernels/tune_*.jsonl --table T.json

Cases, B=1, H=32, bf16 (``--dtype``): ``causal`` (every key tile at or before the diagonal
listed: the work of dense causal attention, the kernel's worst case), ``full`` (non-causal,
every tile) and ``window512`` (causal, a window of 512: the sparse case). Useful TFLOP/s =
FLOPs of the kept pairs (4 * pairs * D per head) over the p50 time; cuDNN SDPA is timed
alongside. ``--table`` writes, per (head dim, length, dtype, causality, case: ``dense`` from
causal/full, ``window`` from window512), the fastest setting (entries of other keys already in
the file are kept). ``--budget-s`` stops measuring new settings past that many seconds (the
table is written from what was measured), so that one GPU call of under 9 minutes writes it.
``--from-jsonl`` builds the table from rows written before (rows without ``D``, ``dtype`` or
``causal`` are the earlier script's: D=128, bf16, causal) and measures nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods import masks  # noqa: E402
from methods.kernels import block_sparse as bsk  # noqa: E402
from runners import bench, records  # noqa: E402

# (block_m, block_n, num_warps, num_stages): the best of a first sweep over tiles 64/128 x
# 64/128, 4/8 warps, 2/3 stages (results/efficiency/kernels/tune_ebc8792.jsonl), and neighbours;
# 256-row tiles from a later sweep (kernels/tune_a514d41.jsonl: 256 x 128, 8 warps, 2 stages best)
CONFIGS = [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3),
           (256, 64, 8, 3), (256, 128, 8, 2)]
CASES = {"causal": (True, bsk.BIG), "full": (False, bsk.BIG), "window512": (True, 512)}  # causal, window
TABLE_CASE = {"causal": "dense", "full": "dense", "window512": "window"}


def table_entries(rows) -> list[dict]:
    """The fastest triton setting per (D, T, dtype, causal, case) of measured rows."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if not str(r.get("kernel", "")).startswith("triton") or r.get("case") not in TABLE_CASE:
            continue
        parts = r["kernel"].split()
        if len(parts) != 4:  # variants (lazy, tma) are not settings of the method path's kernel
            continue
        bm, bn = (int(x) for x in parts[1].split("x"))
        key = (int(r.get("D", 128)), int(r["T"]), r.get("dtype", "bfloat16"),
               bool(r.get("causal", CASES[r["case"]][0])), TABLE_CASE[r["case"]])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = dict(head_dim=key[0], seq_len=key[1], dtype=key[2], causal=key[3], case=key[4],
                             block_m=bm, block_n=bn, num_warps=int(parts[2][1:]), num_stages=int(parts[3][1:]),
                             ms=r["ms"], tflops=r.get("tflops"), gpu=r.get("gpu", "NVIDIA H200"),
                             measured_case=r["case"], commit=r.get("commit"), source=r.get("source"))
    return sorted(best.values(), key=lambda e: (e["head_dim"], e["dtype"], e["causal"], e["case"], e["seq_len"]))


def write_table(path, entries: list[dict]) -> None:
    """Merge ``entries`` into the table at ``path`` (same key: replaced)."""
    p = Path(path)
    key = lambda e: (e["head_dim"], e["seq_len"], e["dtype"], e["causal"], e["case"])  # noqa: E731
    old = json.loads(p.read_text())["entries"] if p.exists() else []
    new = {key(e): e for e in old}
    new.update({key(e): e for e in entries})
    p.write_text(json.dumps({"written_by": "scripts/tune_block_sparse.py --table",
                             "entries": sorted(new.values(), key=key)}, indent=1) + "\n")
    print(f"{path}: {len(entries)} entries written ({len(new)} in all)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu: the Triton interpreter at toy sizes (tests)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", default=None, help="write the fastest settings to this tile table")
    ap.add_argument("--from-jsonl", nargs="+", default=None, help="build --table from these rows; no timing")
    ap.add_argument("--budget-s", type=float, default=None, help="measure no new setting past this many seconds")
    ap.add_argument("--configs", nargs="+", default=None, metavar="BM,BN,WARPS,STAGES",
                    help="launch settings to time (default: CONFIGS)")
    ap.add_argument("--cases", nargs="+", default=["causal", "window512"], choices=list(CASES))
    args = ap.parse_args(argv)
    if args.from_jsonl:
        if not args.table:
            raise SystemExit("--from-jsonl builds a table: give --table")
        rows = [{"source": f, **json.loads(line)} for f in args.from_jsonl
                for line in Path(f).read_text().splitlines() if line.strip()]
        write_table(args.table, table_entries(rows))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("scripts/tune_block_sparse.py times CUDA kernels: no CUDA device here")
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs] if args.configs else CONFIGS
    H, dtype, dev, t0 = args.heads, getattr(torch, args.dtype), args.device, time.monotonic()
    env = records.environment(dev)
    meta = dict(dtype=args.dtype, gpu=env["gpu"], commit=records.git_commit(), source=args.out)
    measured = []

    def keep(row):  # printed, and appended at once: a later failure loses nothing measured
        row = {**row, **meta}
        print(row, flush=True)
        measured.append(row)
        if args.out:
            records.append(args.out, row)

    for D in args.head_dims:
        for T in args.lens:
            q, k, v = (torch.randn(1, H, T, D, device=dev, dtype=dtype) for _ in range(3))
            for causal in sorted({CASES[c][0] for c in args.cases}, reverse=True):
                flops = 4.0 * H * D * (masks.causal_pairs(T, T) if causal else T * T)
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                t = bench.time_ms(sdpa, dev, 3, rep_ms=100)["p50"]
                keep(dict(T=T, D=D, causal=causal, case="causal" if causal else "full", kernel="cuDNN SDPA",
                          ms=t, tflops=flops / t / 1e9))
            for bm, bn, warps, stages in configs:
                for case in args.cases:
                    if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
                        print(f"budget of {args.budget_s} s spent: D={D} T={T} {bm}x{bn} {case} and later not "
                              f"measured", flush=True)
                        continue
                    causal, win = CASES[case]
                    w = torch.tensor([win])
                    idx, cnt, nin = bsk.window_lists(T, bm, bn, causal, (win,), (win,), (0,), dev)
                    fn = lambda: bsk.block_sparse_attention(q, k, v, idx, cnt, nin=nin, block_m=bm, block_n=bn,  # noqa: E731
                                                            causal=causal, win_l=w, win_r=w, num_warps=warps,
                                                            num_stages=stages)
                    try:
                        t = bench.time_ms(fn, dev, 3, rep_ms=100)["p50"]
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                        print(T, D, case, bm, bn, warps, stages, type(exc).__name__, str(exc)[:120], flush=True)
                        continue
                    pairs = (masks.causal_pairs(T, T) if win == bsk.BIG else masks.window_pairs(0, T, win)) \
                        if causal else T * T
                    keep(dict(T=T, D=D, causal=causal, case=case, kernel=f"triton {bm}x{bn} w{warps} s{stages}",
                              ms=t, tflops=4.0 * H * D * pairs / t / 1e9))
    if args.table:
        write_table(args.table, table_entries(measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
