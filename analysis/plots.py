"""Figures from run records (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

BASELINE = "dense"


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(method, impl, timed="forward"):
    """Legend entry: the variant and impl, and the passes its run timed where it is not the
    forward alone (the forward latency of a run that also timed its backward)."""
    return f"{method} ({impl})" if timed == "forward" else f"{method} ({impl}; {timed} run)"


def _method_colours(df: pd.DataFrame) -> dict:
    """One colour per method variant (its implementations share it), dense in black."""
    others = sorted(set(df.loc[df["method"] != BASELINE, "label"]))
    cmap = plt.get_cmap("tab10" if len(others) <= 10 else "tab20")
    return {**{lab: cmap(i % cmap.N) for i, lab in enumerate(others)},
            **{lab: "black" for lab in set(df.loc[df["method"] == BASELINE, "label"])}}


def latency_memory(df: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Forward latency and peak memory against sequence length, log-log, one line per
    method and impl (one colour per method, FlexAttention paths dashed), dense in black. Failed and OOM points are left out, and marked with
    an x at the bottom of the axis so that a missing point is never read as a small one."""
    from analysis.records import labelled

    df = labelled(df[df["runner"] == "kernel"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    color = _method_colours(df)
    for (method, label, timed, impl), g in df.groupby(["method", "label", "timed", "impl"]):
        g = g.sort_values("seq_len")
        ok = g[g["status"] == "ok"]
        if method == BASELINE:
            style = {"color": "black", "linewidth": 2.2}
            if label != BASELINE and "backend=auto" not in label:
                style["linestyle"] = "--"  # dense with a forced backend: dashed beside the default
        else:  # the same method's implementations share its colour: FlexAttention dashed
            style = {"color": color[label]}
            if impl == "flex":
                style.update(linestyle="--", marker="^")
        style = {"linestyle": "-", "marker": "o", **style}
        if timed != "forward":  # the forward of a run that also timed its backward: dotted
            style["linestyle"] = ":"
        axes[0].plot(ok["seq_len"], ok["latency.forward.p50"], label=_label(label, impl, timed), **style)
        if "mem.forward" in ok:
            m = ok.dropna(subset=["mem.forward"])
            axes[1].plot(m["seq_len"], m["mem.forward"] / 2**20, label=_label(label, impl, timed), **style)
        bad = g[(g["status"] != "ok") & g["seq_len"].notna()]  # older build failures have no length
        for ax in axes:
            if len(bad):
                ax.plot(bad["seq_len"], [0.0] * len(bad), "x", color=style.get("color", "red"),
                        transform=ax.get_xaxis_transform(), clip_on=False)
    axes[0].set_ylabel("forward latency, p50 (ms)")
    axes[1].set_ylabel("peak memory above inputs (MiB)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    ncol = min(4, max(1, len(names)))
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    rows = -(-len(names) // ncol)
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (lower is better)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for x2, y2 in points)]


def quality_vs_cost(df: pd.DataFrame, path, title: str = "", quality: str = "metric.rel_err_structured",
                    cost: str = "latency.forward.p50", seq_len: int | None = None) -> Path:
    """Each method's output error against its forward latency at one length (the longest
    with records by default), log-log, the Pareto front (nothing is both faster and more
    accurate) drawn as a line; dense in black."""
    from analysis.records import labelled

    df = labelled(df[(df["runner"] == "kernel") & (df["status"] == "ok")])
    missing = [c for c in (quality, cost) if c not in df.columns]
    if missing:
        raise ValueError(f"no records carry {', '.join(missing)}")
    seq_len = seq_len or int(df["seq_len"].max())
    df = df[(df["seq_len"] == seq_len)].dropna(subset=[quality, cost])
    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [(float(r[cost]), max(float(r[quality]), 1e-4)) for _, r in df.iterrows()]
    front = pareto_front(pts)
    color = _method_colours(df)
    for i, (_, r) in enumerate(df.iterrows()):
        flex = r["impl"] == "flex"  # FlexAttention paths hollow, beside the method's own colour
        ax.scatter(*pts[i], s=70 if i in front else 50, marker="*" if i in front else ("^" if flex else "o"),
                   facecolors="none" if flex else color[r["label"]], edgecolors=color[r["label"]],
                   label=_label(r["label"], r["impl"], r["timed"]), zorder=3)
    fx = sorted(pts[i] for i in front)
    if fx:
        ax.step([p[0] for p in fx], [p[1] for p in fx], where="post", color="grey", ls="--", lw=1,
                label="Pareto front")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"forward latency at {seq_len} tokens, p50 (ms)")
    ax.set_ylabel("relative error against exact attention (structured inputs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def real_model_pareto(df: pd.DataFrame, path, title: str = "") -> Path:
    """Quality inside a pretrained model against prefill time (runner=pretrained records):
    perplexity (left, lower is better) and needle accuracy over every length (right, higher is
    better) against the prefill latency, one point per method and impl, the Pareto front
    (nothing is both faster and better) as a dashed step and starred points; dense in black."""
    from analysis.records import variants

    df = df[(df["runner"] == "pretrained") & (df["status"] == "ok")]
    if df.empty:
        raise ValueError("no ok records of runner=pretrained to draw")
    df = df.assign(label=variants(df)).sort_values("time", kind="stable")
    needle_cols = [c for c in df if c.startswith("metric.needle@")]
    rows = []
    for (label, impl), g in df.groupby(["label", "impl"], sort=False):
        ppl, ndl = g[g["task"] == "perplexity"], g[g["task"] == "needle"]
        if ppl.empty or pd.isna(ppl.iloc[-1].get("latency.prefill.p50")):
            continue  # no timed prefill: nothing to place on the x axis
        last = ppl.iloc[-1]
        needle = ndl.iloc[-1][needle_cols].astype(float).mean() if not ndl.empty and needle_cols else float("nan")
        rows.append({"label": label, "impl": impl, "method": last["method"],
                     "ms": float(last["latency.prefill.p50"]), "ppl": float(last["metric.perplexity"]),
                     "needle": needle})
    pts = pd.DataFrame(rows)
    if pts.empty:
        raise ValueError("no pretrained record carries a timed prefill")
    colour = _method_colours(pts)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, col, sign, name in ((axes[0], "ppl", 1, "perplexity (lower is better)"),
                                (axes[1], "needle", -1, "needle accuracy, mean over lengths (higher is better)")):
        sub = pts.dropna(subset=[col]).reset_index(drop=True)
        front = set(pareto_front([(r["ms"], sign * r[col]) for _, r in sub.iterrows()]))
        for i, r in sub.iterrows():
            ax.scatter(r["ms"], r[col], s=90 if i in front else 45, marker="*" if i in front else "o",
                       color=colour[r["label"]], label=f"{r['label']} ({r['impl']})", zorder=3)
        fx = sorted((sub.loc[i, "ms"], sub.loc[i, col]) for i in front)
        if fx:
            ax.step([p[0] for p in fx], [p[1] for p in fx], where="post", color="grey", ls="--", lw=1,
                    label="Pareto front")
        ax.set_xscale("log")
        if col == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("prefill latency, p50 (ms)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")  # the left panel has every timed method
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def needle_heatmap(cells, path, title: str = "") -> Path:
    """Needle-in-a-haystack accuracy, depth (rows) x context length (columns), from a list of
    {"length", "depth", "score"} cells (one record's metrics.cells); failed cells are absent."""
    df = pd.DataFrame(cells)
    piv = df.pivot_table(index="depth", columns="length", values="score", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(piv.columns), 1.2 + 0.5 * len(piv.index)))
    im = ax.imshow(piv.values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(piv.columns)), [str(c) for c in piv.columns])
    ax.set_yticks(range(len(piv.index)), [f"{d:.0%}" for d in piv.index])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(piv.shape[0]):
        for j in range(piv.shape[1]):
            v = piv.values[i, j]
            ax.text(j, i, "-" if pd.isna(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="exact-match accuracy")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _decode_records(df: pd.DataFrame) -> pd.DataFrame:
    from analysis.records import labelled

    return labelled(df[(df["runner"] == "decode") & (df["status"] == "ok")])


def decode_latency(df: pd.DataFrame, path, title: str = "") -> Path:
    """runner=decode: the decode step's latency (p50, index + attention) against the context
    length L, log-log, one line per method variant and impl, dense in black; the index part
    (append + select) dotted beside it where a method has one."""
    df = _decode_records(df).dropna(subset=["latency.decode_step.p50"])
    if df.empty:
        raise ValueError("no ok runner=decode records with step latencies")
    color = _method_colours(df)
    fig, ax = plt.subplots(figsize=(7, 5))
    for (label, impl), g in df.groupby(["label", "impl"], sort=True):
        g = g.groupby("seq_len", as_index=False)[["latency.decode_step.p50", "latency.decode_index.p50"]].mean()
        ax.plot(g["seq_len"], g["latency.decode_step.p50"], marker="o", color=color[label], label=f"{label} ({impl})")
        idx = g["latency.decode_index.p50"]
        if (idx > 0.05 * g["latency.decode_step.p50"]).any():  # a method that spends time selecting
            ax.plot(g["seq_len"], idx, ls=":", color=color[label], lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context length L (prefill tokens)")
    ax.set_ylabel("decode step p50 (ms); dotted: its index/selection part")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def decode_frontier(df: pd.DataFrame, path, title: str = "", seq_len: int | None = None) -> Path:
    """runner=decode: attention recall against the bytes a decode step read at one context
    length (the longest with records by default), x log; the quality-cost frontier (nothing
    reads fewer bytes with more recall) as a dashed line; dense in black."""
    df = _decode_records(df).dropna(subset=["metric.bytes_read_per_step", "metric.decode_recall_mean"])
    if df.empty:
        raise ValueError("no ok runner=decode records with bytes read and recall")
    seq_len = seq_len or int(df["seq_len"].max())
    df = df[df["seq_len"] == seq_len].groupby(["method", "label", "impl"], as_index=False)[
        ["metric.bytes_read_per_step", "metric.decode_recall_mean"]].mean()
    pts = [(float(r["metric.bytes_read_per_step"]), -float(r["metric.decode_recall_mean"])) for _, r in df.iterrows()]
    front = pareto_front(pts)
    color = _method_colours(df)
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (_, r) in enumerate(df.iterrows()):
        ax.scatter(pts[i][0], -pts[i][1], s=70 if i in front else 50, marker="*" if i in front else "o",
                   color=color[r["label"]], label=f"{r['label']} ({r['impl']})", zorder=3)
    fx = sorted(pts[i] for i in front)
    if fx:
        ax.step([p[0] for p in fx], [-p[1] for p in fx], where="post", color="grey", ls="--", lw=1,
                label="frontier")
    ax.set_xscale("log")
    ax.set_xlabel(f"bytes read per decode step at L={seq_len} (index + K/V)")
    ax.set_ylabel("attention recall (dense mass on the keys read)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)
