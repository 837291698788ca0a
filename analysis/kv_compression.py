"""KV-cache compression results (scripts/kv_compression.py): accuracy against the measured
compression, per task, from runner=pretrained records of presses and their dense reference.

    from analysis import kv_compression
    rows = kv_compression.rows("results/kv_compression/records.jsonl")
    print(kv_compression.table(rows)); kv_compression.frontier(rows, "frontier.png")

A row: method, task, the nominal setting (ratio, or FastGen's recovery), the multi-turn
setting, the accuracy (needle: mean over lengths; RULER: the average score; multi-turn: every
turn of every trial, and per turn), and the measured compression = 1 - bytes held / dense
bytes (``kv_share_held``: the caches' tensors after the prefill's compression, against a dense
cache of the same tokens). Dense (no press) sits at compression 0.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.plots import _save, pareto_front, plt

TASKS = ("needle", "ruler", "multiturn")


def _accuracy(rec: dict) -> float | None:
    m = rec.get("metrics", {})
    if rec["task"] == "needle":
        vals = [v for k, v in m.items() if k.startswith("needle@")]
        return sum(vals) / len(vals) if vals else None
    if rec["task"] == "ruler":
        return m.get("average")
    return m.get("accuracy")


def _by_length(rec: dict) -> dict:
    """Accuracy per prompt length ({tokens: accuracy}, from the ``<task>@<tokens>`` metrics)."""
    pre = rec["task"] + "@"
    return {int(k[len(pre):]): float(v) for k, v in rec.get("metrics", {}).items()
            if k.startswith(pre) and k[len(pre):].isdigit() and v is not None}


def rows(store) -> pd.DataFrame:
    """One row per newest ok record of a (method, task, setting) in ``store``."""
    from runners.records import read

    out = []
    for rec in read(store):
        if rec.get("status") != "ok" or rec.get("task") not in TASKS:
            continue
        m, p = rec.get("metrics", {}), rec.get("method_params", {})
        knob = "recovery" if "recovery" in p else ("ratio" if "ratio" in p else None)
        share = m.get("kv_share_held", 1.0 if rec["method"] == "dense" else None)
        out.append({"method": rec["method"], "task": rec["task"], "knob": knob,
                    "nominal": p.get(knob) if knob else None,
                    "setting": rec.get("details", {}).get("setting") or rec["config"]["task"].get("setting")
                    or "query_aware",
                    "accuracy": _accuracy(rec), "compression": None if share is None else 1.0 - float(share),
                    "kv_bytes_held": m.get("kv_bytes_held_prefill"), "kv_bytes_dense": m.get("kv_bytes_dense"),
                    "kv_bytes_allocated": m.get("kv_bytes_allocated_prefill"),
                    "peak_bytes_allocated": m.get("peak_bytes_allocated"),
                    "turns": [m[k] for k in sorted(m) if k.startswith("multiturn_turn")],
                    "by_length": _by_length(rec), "time": rec["time"]})
    df = pd.DataFrame(out)
    if df.empty:
        return df
    df = df.sort_values("time", kind="stable")
    return df.drop_duplicates(["method", "task", "knob", "nominal", "setting"], keep="last").reset_index(drop=True)


def table(df: pd.DataFrame) -> str:
    """Markdown: per task (and multi-turn setting), one row per method, one column per nominal
    ratio (FastGen: recovery), each cell "accuracy (measured compression)"; multi-turn cells add
    the accuracy per turn."""
    if df.empty:
        return "no records\n"
    parts = []
    for (task, setting), g in df.groupby(["task", "setting"], sort=True):
        parts.append(f"### {task}" + (f" ({setting})" if task == "multiturn" else "") + "\n")
        parts.append("accuracy (measured compression: 1 - bytes held / dense bytes)"
                     + ("; per turn in brackets" if task == "multiturn" else "")
                     + ("; per prompt length in braces (the compression is the mean over all the run's prompts)"
                        if g["by_length"].map(lambda d: len(d or {}) > 1).any() else "") + "\n")
        nominal = sorted({x for x in g["nominal"].dropna() if g[g["nominal"] == x]["knob"].iloc[0] == "ratio"})
        parts.append("| method | " + " | ".join(f"ratio {r:g}" for r in nominal) + " | other |")
        parts.append("|:--|" + "--:|" * (len(nominal) + 1))
        for method, mg in g.groupby("method", sort=True):
            cells, other = [], []
            for r in nominal:
                hit = mg[(mg["knob"] == "ratio") & (mg["nominal"] == r)]
                cells.append(_cell(hit.iloc[0], task) if len(hit) else "")
            for _, row in mg[mg["knob"] != "ratio"].iterrows():
                lab = f"{row['knob']} {row['nominal']:g}: " if isinstance(row["knob"], str) else "no press: "
                other.append(lab + _cell(row, task))
            parts.append(f"| {method} | " + " | ".join(cells) + " | " + "; ".join(other) + " |")
        parts.append("")
    return "\n".join(parts) + "\n"


def _cell(row, task: str) -> str:
    acc = "n/a" if row["accuracy"] is None or pd.isna(row["accuracy"]) else f"{row['accuracy']:.2f}"
    comp = "" if row["compression"] is None or pd.isna(row["compression"]) else f" ({row['compression']:.2f})"
    turns = " [" + ", ".join(f"{t:.2f}" for t in row["turns"]) + "]" if task == "multiturn" and row["turns"] else ""
    bl = row.get("by_length") or {}
    lengths = " {" + ", ".join(f"{n}: {a:.2f}" for n, a in sorted(bl.items())) + "}" if len(bl) > 1 else ""
    return acc + comp + turns + lengths


def frontier(df: pd.DataFrame, path, title: str = "") -> Path:
    """Accuracy against measured compression, one panel per task (and multi-turn setting), one
    line per method; dense as a horizontal line; the frontier (nothing compresses more at a
    higher accuracy) as a dashed grey step with starred points. Records of several prompt
    lengths: one row of panels per length (that length's accuracy; the compression is the
    run's mean over all its prompts)."""
    if df.empty:
        raise ValueError("no records to draw")
    panels = [(t, s) for t, s in sorted(set(zip(df["task"], df["setting"])))]
    lengths = sorted({n for d in df["by_length"] for n in (d or {})}) if "by_length" in df else []
    lengths = lengths if len(lengths) > 1 else [None]
    fig, axes = plt.subplots(len(lengths), len(panels), figsize=(5 * len(panels), 4.2 * len(lengths)), squeeze=False)
    methods = sorted(set(df["method"]) - {"dense"})
    cmap = plt.get_cmap("tab10")
    colour = {m: cmap(i % 10) for i, m in enumerate(methods)}
    for r, n in enumerate(lengths):
        for ax, (task, setting) in zip(axes[r], panels):
            g = df[(df["task"] == task) & (df["setting"] == setting)].copy()
            if n is not None:
                g["accuracy"] = g["by_length"].map(lambda d: (d or {}).get(n))
            g = g.dropna(subset=["accuracy", "compression"])
            for m in methods:
                mg = g[g["method"] == m].sort_values("compression")
                if len(mg):
                    ax.plot(mg["compression"], mg["accuracy"], "o-", color=colour[m], label=m, ms=4, lw=1)
            dense = g[g["method"] == "dense"]
            if len(dense):
                ax.axhline(float(dense["accuracy"].iloc[-1]), color="black", lw=1, label="dense (no press)")
            pts = [(-c, -a) for c, a in zip(g["compression"], g["accuracy"])]
            front = sorted((-pts[i][0], -pts[i][1]) for i in pareto_front(pts)) if pts else []
            if front:
                ax.step([p[0] for p in front], [p[1] for p in front], where="pre", color="grey", ls="--", lw=1,
                        label="frontier")
                ax.scatter([p[0] for p in front], [p[1] for p in front], marker="*", s=80, color="grey", zorder=4)
            ax.set_xlabel("measured compression (1 - bytes held / dense)")
            ax.set_ylabel("accuracy")
            ax.set_xlim(-0.02, 1.0)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(True, alpha=0.3)
            ax.set_title(task + (f" ({setting})" if task == "multiturn" else "") + (f", {n} tokens" if n else ""))
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["rows", "table", "frontier"]
