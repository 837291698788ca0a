"""Leaderboard of run records: quality, latency and memory per method (tables built by
``analysis.tables``, rendered by ``analysis.render``), and its figures.

    python -m analysis.leaderboard --store results/local/records.jsonl --out results/local/leaderboard.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.plots import latency_memory, quality_vs_cost, real_model_pareto
from analysis.records import load
from analysis.render import render
from analysis.tables import settings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", nargs="+", default=["results/local/records.jsonl"])
    ap.add_argument("--out", default=None, help="also write the table here (format by suffix: .md, .csv, .tex, .html)")
    ap.add_argument("--plot", default=None, help="also save the latency/memory plot (PNG) here")
    ap.add_argument("--pareto", default=None, help="also save quality against cost (PNG) here")
    ap.add_argument("--real-pareto", default=None,
                    help="also save quality inside the pretrained model against prefill time (PNG) here")
    args = ap.parse_args(argv)
    missing = [s for s in args.store if not Path(s).exists()]
    if missing:
        print(f"no results store at {', '.join(missing)}: run `make run` or `attnbench` first",
              file=sys.stderr)
        return 1
    df = load(*args.store)
    if df.empty:
        print(f"no records in {', '.join(args.store)}: the store is empty (or holds only corrupt lines)",
              file=sys.stderr)
        return 1
    text = render(df)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".csv": "csv", ".tex": "latex", ".html": "html"}.get(out.suffix, "md")
        out.write_text(text if fmt == "md" else render(df, fmt))
        print(f"leaderboard written to {args.out}")
    for base, draw, what in ((args.plot, latency_memory, "latency/memory"),
                             (args.pareto, quality_vs_cost, "quality/cost")):
        if not base:
            continue
        drawable = [(t, g) for t, g in settings(df) if (g["status"] == "ok").any()]  # something to draw
        for i, (title, g) in enumerate(drawable):  # one figure per setting: F, F-1, F-2, ...
            p = Path(base) if i == 0 else Path(base).with_name(f"{Path(base).stem}-{i}{Path(base).suffix}")
            draw(g, p, title)
            print(f"{what} plot ({title}) written to {p}")
    if args.real_pareto:
        models = ", ".join(sorted(df.loc[df["runner"] == "pretrained", "model"].dropna().unique()))
        print(f"quality/prefill plot written to {real_model_pareto(df, args.real_pareto, models)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
