"""Leaderboard of run records: quality, latency and memory per method (tables built by
``analysis.tables``, rendered by ``analysis.render``), and its figures.

    python -m analysis.leaderboard --store results/local/records.jsonl --out results/local/leaderboard.md
    python -m analysis.leaderboard --store results/decode/records.jsonl --decode-dir results/decode
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.plots import (
    decode_frontier,
    decode_latency,
    latency_memory,
    quality_vs_cost,
    real_model_pareto,
)
from analysis.records import load
from analysis.render import DECODE_NOTE, render
from analysis.tables import decode_table, settings


def decode_report(df, out_dir) -> list[Path]:
    """The decode leaderboard of runner=decode records in ``out_dir``: ``decode_table.md`` (one
    table per setting: ``analysis.tables.decode_table``) and per setting with ok records the
    step latency against context length (``step_latency.png``) and recall against bytes read
    at the longest length (``recall_vs_bytes.png``); settings after the first get ``-1``,
    ``-2``, ... Returns the files written."""
    out, written, parts = Path(out_dir), [], []
    out.mkdir(parents=True, exist_ok=True)
    drawable = 0
    for title, g in settings(df, "decode"):
        parts.append(f"### Decode: {title}\n\n" + decode_table(g).to_markdown(index=False, disable_numparse=True))
        if not (g["status"] == "ok").any():
            continue
        suffix = "" if drawable == 0 else f"-{drawable}"
        written.append(decode_latency(g, out / f"step_latency{suffix}.png", title))
        written.append(decode_frontier(g, out / f"recall_vs_bytes{suffix}.png", title))
        drawable += 1
    if not parts:
        raise ValueError("no runner=decode records")
    (out / "decode_table.md").write_text("\n\n".join(parts) + "\n\n" + DECODE_NOTE)
    return [out / "decode_table.md", *written]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", nargs="+", default=["results/local/records.jsonl"])
    ap.add_argument("--out", default=None, help="also write the table here (format by suffix: .md, .csv, .tex, .html)")
    ap.add_argument("--plot", default=None, help="also save the latency/memory plot (PNG) here")
    ap.add_argument("--pareto", default=None, help="also save quality against cost (PNG) here")
    ap.add_argument("--real-pareto", default=None,
                    help="also save quality inside the pretrained model against prefill time (PNG) here")
    ap.add_argument("--decode-dir", default=None,
                    help="also write the decode table and its two plots (runner=decode records) here")
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
    if args.decode_dir:
        for p in decode_report(df, args.decode_dir):
            print(f"decode report: {p}")
    if args.real_pareto:
        models = ", ".join(sorted(df.loc[df["runner"] == "pretrained", "model"].dropna().unique()))
        print(f"quality/prefill plot written to {real_model_pareto(df, args.real_pareto, models)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
