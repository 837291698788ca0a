"""MInference's per-head pattern search (``MInference.calibrate``) on calibration inputs,
written as the JSON pattern file that ``pattern=searched`` reads (``pattern_file``).

    python scripts/minference_search.py --out patterns.json --budget 0.1
    python scripts/minference_search.py --out p.json --calibration qk.pt   # {'q':..., 'k':...}

Without --calibration the inputs are the fidelity task's structured q/k (a few dominant keys
per query); calibrating on q/k captured from a model (tasks.capture) is the better choice.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from methods.minference import save_patterns  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=0.1, help="largest density per head")
    ap.add_argument("--calibration", help="a torch file with {'q': ..., 'k': ...} [B, H, T, D]")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--num-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slash-mode", default="ranges", choices=("ranges", "lines"))
    args = ap.parse_args(argv)
    if args.calibration:
        d = torch.load(args.calibration, weights_only=True)
        q, k, source = d["q"], d["k"], args.calibration
    else:
        from tasks.fidelity import structured_qkv

        q, k, _ = structured_qkv(1, args.num_heads, args.num_heads, args.seq_len, args.head_dim,
                                 "cpu", torch.float32, args.seed, causal=True)
        source = f"fidelity structured inputs, T={args.seq_len}, seed={args.seed}"
    m = methods.load("minference", num_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[-1],
                     impl="reference", slash_mode=args.slash_mode)
    heads = m.calibrate([(q, k)], args.budget)
    save_patterns(args.out, heads, budget=args.budget, calibration=source, slash_mode=args.slash_mode)
    for i, h in enumerate(heads):
        print(f"head {i}: {h['pattern']:<15} density {h['density']:.3f} recall {h['recall']:.3f}")
    print(f"patterns written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
