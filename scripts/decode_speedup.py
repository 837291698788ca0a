"""Decode step time against dense decode's (issue 24's target: at 128k context and a 2k-token
budget, a selection method's step, selection included, at least 20 times below dense decode's).

From runner=decode records, per setting (``analysis.tables.settings``: device, dtype, shape)
and prefill length L: each method's step time (p50 of index + attention, ms), dense decode's at
the same L and setting, the speed-up dense / method, the same from the CUDA-graph replay of the
last step's select + attend (``decode_step_graph``: device time without Python's launch cost;
"-" where it was not captured), the selection share of the step, the share of dense decode's
bytes read and the speed-up it bounds (1 / that share: a step that only streamed its bytes at
dense decode's rate), and the attention recall. Rows of L without a dense record are
left out (nothing to compare with).

    python scripts/decode_speedup.py --store results/decode/records.jsonl --out results/decode/speedup.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.records import labelled, load  # noqa: E402
from analysis.tables import BASELINE, settings  # noqa: E402

STEP, INDEX, GRAPH = "latency.decode_step.p50", "latency.decode_index.p50", "latency.decode_step_graph.p50"
TARGET = 20.0


def speedup_table(g: pd.DataFrame) -> pd.DataFrame:
    """One setting's ok runner=decode records -> a row per (method variant, L), fastest first per L."""
    g = labelled(g[g["status"] == "ok"])
    if g.empty or STEP not in g:
        return pd.DataFrame()
    num = lambda c: pd.to_numeric(g[c], errors="coerce") if c in g else pd.Series(float("nan"), index=g.index)  # noqa: E731
    g = g.assign(step=num(STEP), index=num(INDEX), graph=num(GRAPH), read=num("metric.read_fraction"),
                 recall=num("metric.decode_recall_mean"))
    per = g.groupby(["label", "seq_len"], as_index=False)[["step", "index", "graph", "read", "recall"]].mean()
    base = per[per["label"].astype(str).str.startswith(BASELINE)].groupby("seq_len")
    dense, dense_graph = base["step"].min(), base["graph"].min()
    rows = []
    for _, r in per.iterrows():
        L = int(r["seq_len"])
        if L not in dense.index:
            continue
        up = dense[L] / r["step"]
        gup = dense_graph[L] / r["graph"]  # NaN where either was not captured
        rows.append({"L": L, "method": r["label"], "step p50 ms": f"{r['step']:.3f}",
                     "dense p50 ms": f"{dense[L]:.3f}", "speed-up": f"{up:.1f}x",
                     f">= {TARGET:.0f}x": "yes" if up >= TARGET else "no",
                     "graph ms": "-" if pd.isna(r["graph"]) else f"{r['graph']:.4f}",
                     "graph speed-up": "-" if pd.isna(gup) else f"{gup:.1f}x",
                     "selection share": "-" if pd.isna(r["index"]) else f"{r['index'] / r['step']:.0%}",
                     "read fraction": "-" if pd.isna(r["read"]) else f"{r['read']:.4f}",
                     "bytes bound": "-" if pd.isna(r["read"]) or r["read"] <= 0 else f"{1 / r['read']:.1f}x",
                     "recall": "-" if pd.isna(r["recall"]) else f"{r['recall']:.3f}", "_up": up})
    if not rows:
        return pd.DataFrame()
    out = pd.DataFrame(rows).sort_values(["L", "_up"], ascending=[True, False], kind="stable")
    return out.drop(columns="_up").reset_index(drop=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", nargs="+", required=True)
    ap.add_argument("--out", default=None, help="also write the tables here (markdown)")
    args = ap.parse_args(argv)
    df = load(*[s for s in args.store if Path(s).exists()])
    parts = []
    for title, g in settings(df, "decode") or ():
        t = speedup_table(g)
        if not t.empty:
            parts.append(f"### Decode speed-up against dense decode: {title}\n\n" + t.to_markdown(index=False))
    if not parts:
        print("decode_speedup: no ok runner=decode records with a dense baseline at the same length", file=sys.stderr)
        return 1
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"decode speed-up written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
