"""Figures from run records (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

BASELINE = "dense"


def _label(method, impl):
    return f"{method} ({impl})"


def latency_memory(df: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Forward latency and peak memory against sequence length, log-log, one line per
    method and impl, dense in black. Failed and OOM points are left out, and marked with
    an x at the bottom of the axis so that a missing point is never read as a small one."""
    from analysis.records import variants

    df = df[df["runner"] == "kernel"].copy()
    df["label"] = variants(df)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for (method, label, impl), g in df.groupby(["method", "label", "impl"]):
        g = g.sort_values("seq_len")
        ok = g[g["status"] == "ok"]
        style = {"color": "black", "linewidth": 2.2} if method == BASELINE else {}
        if method == BASELINE and label != BASELINE and "backend=auto" not in label:
            style["linestyle"] = "--"  # dense with a forced backend: dashed beside the default
        axes[0].plot(ok["seq_len"], ok["latency.forward.p50"], marker="o", label=_label(label, impl), **{"linestyle": "-", **style})
        if "mem.forward" in ok:
            m = ok.dropna(subset=["mem.forward"])
            axes[1].plot(m["seq_len"], m["mem.forward"] / 2**20, marker="o", label=_label(label, impl), **{"linestyle": "-", **style})
        bad = g[g["status"] != "ok"]
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
