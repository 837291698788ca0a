"""Figures and tables of the language-model evaluations, from records.

    python -m analysis.figures needle --store results/lm/records.jsonl --out results/lm
    python -m analysis.figures ruler  --store results/lm/records.jsonl --out results/lm/ruler.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.plots import needle_heatmap
from analysis.tables import needle_cells, ruler_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["needle", "ruler"])
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True, help="a folder (needle heatmaps) or a file (RULER table)")
    args = ap.parse_args(argv)
    if args.what == "needle":
        cells = needle_cells(args.store)
        if not cells:
            print(f"no ok needle records in {args.store}", file=sys.stderr)
            return 1
        for label, c in cells.items():
            p = needle_heatmap(c, Path(args.out) / f"needle-{label}.png", f"needle in a haystack: {label}")
            print(f"needle heatmap written to {p}")
        return 0
    t = ruler_table(args.store)
    if t.empty:
        print(f"no ok RULER records in {args.store}", file=sys.stderr)
        return 1
    text = t.to_markdown(index=False, disable_numparse=True)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
