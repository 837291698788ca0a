"""Throughput of the block-sparse kernel on the H200 by tile shape and launch settings.

    python scripts/tune_block_sparse.py [--lens 16384 65536] [--out F.jsonl]

Causal attention with every key tile at or before the diagonal listed (so the work is that
of dense causal attention, the kernel's worst case), B=1, H=32, D=128, bf16; and the same
for a sliding window of 512 (the sparse case). Useful TFLOP/s = FLOPs of the kept pairs
(4 * pairs * D per head) over the p50 time; cuDNN SDPA is timed alongside.
"""
from __future__ import annotations

import argparse
import sys
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", nargs="+", default=None, metavar="BM,BN,WARPS,STAGES",
                    help="launch settings to time (default: CONFIGS)")
    ap.add_argument("--cases", nargs="+", default=["causal", "window512"], choices=["causal", "window512"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("scripts/tune_block_sparse.py times CUDA kernels: no CUDA device here")
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs] if args.configs else CONFIGS
    H, D = 32, 128

    def keep(row):  # printed, and appended at once: a later failure loses nothing measured
        print(row, flush=True)
        if args.out:
            records.append(args.out, row)

    for T in args.lens:
        q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4.0 * H * D * masks.causal_pairs(T, T)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        t = bench.time_ms(sdpa, "cuda", 3, rep_ms=100)["p50"]
        keep(dict(T=T, case="causal", kernel="cuDNN SDPA", ms=t, tflops=flops / t / 1e9))
        for bm, bn, warps, stages in configs:
            for case, win in [c for c in (("causal", bsk.BIG), ("window512", 512)) if c[0] in args.cases]:
                w = torch.tensor([win])
                idx, cnt, nin = bsk.window_lists(T, bm, bn, True, (win,), (bsk.BIG,), (0,), "cuda")
                fn = lambda: bsk.block_sparse_attention(q, k, v, idx, cnt, nin=nin, block_m=bm, block_n=bn,  # noqa: E731
                                                        causal=True, win_l=w, num_warps=warps, num_stages=stages)
                try:
                    t = bench.time_ms(fn, "cuda", 3, rep_ms=100)["p50"]
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                    print(T, case, bm, bn, warps, stages, type(exc).__name__, str(exc)[:120], flush=True)
                    continue
                pairs = masks.causal_pairs(T, T) if case == "causal" else masks.window_pairs(0, T, win)
                keep(dict(T=T, case=case, kernel=f"triton {bm}x{bn} w{warps} s{stages}", ms=t,
                          tflops=4.0 * H * D * pairs / t / 1e9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
