"""The best recall any selection of k keys can reach on runner=decode's structured inputs (the
fidelity task's ``structured_qkv``: ``num_dominant`` keys per query about ``dominance`` above the
rest): the dense attention mass on each query's top-k keys, for the last queries of a length-L
sequence. Read a decode table's recall against it: at long L the same dominance spreads the mass.

    python scripts/decode_oracle_recall.py --lens 4096 32768 131072 --k 4 2048
"""
from __future__ import annotations

import argparse
import math

import torch

from tasks.fidelity import structured_qkv


def oracle(T: int, ks: list[int], D: int = 128, heads: int = 2, rows: int = 4, seed: int = 0,
           num_dominant: int = 4, dominance: float = 8.0) -> dict[int, float]:
    """{k: mean over the last ``rows`` queries and ``heads`` heads of the softmax mass on its top-k keys}."""
    q, k, _ = structured_qkv(1, heads, 1, T, D, "cpu", torch.float32, seed, True, num_dominant, dominance)
    p = torch.softmax((q[0, :, -rows:] @ k[0, 0].T) / math.sqrt(D), -1)  # the last rows see every key
    return {n: float(p.topk(min(n, T), -1).values.sum(-1).mean()) for n in ks}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--k", type=int, nargs="+", default=[4, 2048])
    ap.add_argument("--dominance", type=float, default=8.0)
    args = ap.parse_args(argv)
    print("| L | " + " | ".join(f"mass on the top {n} keys" for n in args.k) + " |")
    print("|---|" + "---|" * len(args.k))
    for T in args.lens:
        r = oracle(T, args.k, dominance=args.dominance)
        print(f"| {T} | " + " | ".join(f"{r[n]:.3f}" for n in args.k) + " |")


if __name__ == "__main__":
    main()
