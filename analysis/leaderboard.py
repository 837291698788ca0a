"""Leaderboard of kernel-runner records: quality, latency and memory per method.

    python -m analysis.leaderboard --store results/local/records.jsonl --out results/local/leaderboard.md

One table per (device, dtype, causal) setting. A failed or OOM run shows its status, never
a number. Speedups are against the dense baseline of the same setting and length.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.records import load, variants

BASELINE = "dense"


def _cell(row, col, fmt):
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    v = row.get(col)
    return "-" if v is None or pd.isna(v) else fmt.format(v)


def kernel_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows: method (and impl); columns: fidelity at the longest length, forward latency
    per length, peak memory and speedup over dense at the longest length."""
    df = df[df["runner"] == "kernel"].copy()
    df["label"] = variants(df)
    lens = sorted(int(t) for t in df["seq_len"].dropna().unique())
    if not lens:
        return pd.DataFrame()
    tmax = lens[-1]
    dense = df[(df["method"] == BASELINE) & (df["status"] == "ok")]
    dense = dense[dense["impl"] != "reference"] if (dense["impl"] != "reference").any() else dense
    auto = dense["method_params"].apply(lambda p: isinstance(p, dict) and p.get("backend", "auto") == "auto")
    dense = dense[auto] if auto.any() else dense  # the default backend: PyTorch's fastest
    base = dense.set_index("seq_len")["latency.forward.p50"].to_dict()
    rows = []
    for (label, impl), g in df.groupby(["label", "impl"], sort=True):
        by_len = {int(r["seq_len"]): r for _, r in g.iterrows() if pd.notna(r["seq_len"])}
        last = by_len.get(tmax)
        row = {"method": label, "impl": impl,
               "real kernel": "yes" if g["real_kernel"].all() else "no"}
        row["rel err (random)"] = _cell(last, "metric.rel_err_random", "{:.3f}")
        row["rel err (structured)"] = _cell(last, "metric.rel_err_structured", "{:.3f}")
        for t in lens:
            row[f"fwd ms @{t}"] = _cell(by_len.get(t), "latency.forward.p50", "{:.3f}")
        row[f"bwd ms @{tmax}"] = _cell(last, "latency.backward.p50", "{:.3f}")
        row[f"peak MiB @{tmax}"] = "-" if last is None or last["status"] != "ok" else (
            "-" if pd.isna(last.get("mem.forward")) else f"{last['mem.forward'] / 2**20:.1f}")
        row[f"density @{tmax}"] = _cell(last, "cost.density", "{:.3f}")
        sp = "-"
        if last is not None and last["status"] == "ok" and tmax in base:
            sp = f"{base[tmax] / last['latency.forward.p50']:.2f}x"
        row[f"speedup @{tmax}"] = sp
        rows.append(row)
    return pd.DataFrame(rows)


def efficiency_lengths(df: pd.DataFrame) -> pd.DataFrame:
    """The efficiency length of each method, as the CAB benchmark defines it: the shortest
    measured sequence length at which it is faster than dense attention (forward p50) and
    the shortest at which it needs less memory ("> T" when it never does up to the longest
    length measured)."""
    df = df[(df["runner"] == "kernel") & (df["status"] == "ok")].copy()
    if df.empty:
        return pd.DataFrame()
    df["label"] = variants(df)
    dense = df[(df["method"] == BASELINE) & (df["impl"] != "reference")]
    auto = dense["method_params"].apply(lambda p: isinstance(p, dict) and p.get("backend", "auto") == "auto")
    dense = dense[auto] if auto.any() else dense
    t_base = dense.set_index("seq_len")["latency.forward.p50"].to_dict()
    m_base = dense.set_index("seq_len")["mem.forward"].to_dict() if "mem.forward" in dense else {}
    rows = []
    for (label, impl), g in df[df["method"] != BASELINE].groupby(["label", "impl"]):
        g = g.sort_values("seq_len")
        lens = [int(t) for t in g["seq_len"]]

        def first(col, base):
            for _, r in g.iterrows():
                t = int(r["seq_len"])
                if t in base and pd.notna(r.get(col)) and r[col] < base[t]:
                    return str(t)
            return f"> {max(lens)}"

        rows.append({"method": label, "impl": impl, "faster from": first("latency.forward.p50", t_base),
                     "leaner from": first("mem.forward", m_base)})
    return pd.DataFrame(rows)


LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")


def lra_table(df: pd.DataFrame) -> pd.DataFrame:
    """The LRA table: test accuracy (%) per method (rows) and task (columns) from training
    records, with the average over the tasks present; a failed run shows its status, a task
    not run shows "-" (the newest record of each method and task counts)."""
    df = df[(df["runner"] == "train") & df["task"].astype(str).str.startswith("lra/")].copy()
    if df.empty:
        return pd.DataFrame()
    df["label"] = variants(df)
    rows = []
    for label, g in df.groupby("label", sort=True):
        row, accs = {"method": label}, []
        for t in LRA_TASKS:
            r = g[g["task"] == f"lra/{t}"].sort_values("time")
            if r.empty:
                row[t] = "-"
                continue
            r = r.iloc[-1]
            if r["status"] != "ok":
                row[t] = r["status"]
                continue
            acc = 100 * float(r["metric.test_acc"])
            accs.append(acc)
            row[t] = f"{acc:.2f}"
        row["avg"] = f"{sum(accs) / len(accs):.2f}" if accs else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def settings(df: pd.DataFrame):
    """(title, sub-frame) per (device/gpu, dtype, causal) setting of kernel records."""
    df = df[df["runner"] == "kernel"].copy()
    df["where"] = df["gpu"].fillna(df["device"])
    for (where, dtype, causal), g in df.groupby(["where", "dtype", "causal"], dropna=False):
        yield f"{where}, {dtype}, {'causal' if causal else 'non-causal'}", g


def render(df: pd.DataFrame) -> str:
    parts = []
    lra = lra_table(df)
    if not lra.empty:
        parts.append("### Long Range Arena, test accuracy (%)\n\n" + lra.to_markdown(index=False, disable_numparse=True) + "\n")
    for title, g in settings(df):
        parts.append(f"### {title}\n\n" + kernel_table(g).to_markdown(index=False, disable_numparse=True) + "\n")
        eff = efficiency_lengths(g)
        if not eff.empty:
            parts.append("Efficiency length (shortest length at which the method beats dense attention):\n\n"
                         + eff.to_markdown(index=False, disable_numparse=True) + "\n")
    return "\n".join(parts) if parts else "(no records)\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", nargs="+", default=["results/local/records.jsonl"])
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--plot", default=None, help="also save the latency/memory plot (PNG) here")
    ap.add_argument("--pareto", default=None, help="also save quality against cost (PNG) here")
    args = ap.parse_args(argv)
    missing = [s for s in args.store if not Path(s).exists()]
    if missing:
        print(f"no results store at {', '.join(missing)}: run `make run` or `attnbench` first",
              file=sys.stderr)
        return 1
    df = load(*args.store)
    text = render(df)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"leaderboard written to {args.out}")
    if args.plot:
        from analysis.plots import latency_memory

        for i, (title, g) in enumerate(settings(df)):
            p = Path(args.plot)
            p = p if i == 0 else p.with_name(f"{p.stem}-{i}{p.suffix}")
            latency_memory(g, p, title)
            print(f"latency/memory plot ({title}) written to {p}")
    if args.pareto:
        from analysis.plots import quality_vs_cost

        for i, (title, g) in enumerate(settings(df)):
            p = Path(args.pareto)
            p = p if i == 0 else p.with_name(f"{p.stem}-{i}{p.suffix}")
            quality_vs_cost(g, p, title)
            print(f"quality/cost plot ({title}) written to {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
