"""Leaderboard tables as pandas DataFrames, built from run records (``analysis.records.load``).

One kernel table per (device, dtype, causal, attention shape) setting: rows are a method
variant, the passes its runs timed (``timed``: forward, backward or forward+backward, from
the records' latency keys) and its implementation; a failed or OOM run shows its status,
never a number; speedups are against the dense baseline of the same setting and length.
Rendering them (markdown, LaTeX, HTML, CSV) is ``analysis.render``.
"""
from __future__ import annotations

import pandas as pd

from analysis.records import failure, labelled, setting_labels, variants, with_setting

BASELINE = "dense"


def bootstrap_ci(values, level: float = 0.95, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and the percentile bootstrap confidence interval of the mean."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = rng.choice(v, size=(n, len(v)), replace=True).mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def _cell(rows, col, fmt, scale: float = 1.0):
    """One value, or over several seeds "mean ± half-width of the 95% bootstrap interval";
    a run that did not succeed shows its status."""
    if rows is None or (isinstance(rows, list) and not rows):
        return "-"
    rows = rows if isinstance(rows, list) else [rows]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        return failure(bad[0]["status"], bad[0].get("error"))
    vals = [r.get(col) for r in rows]
    vals = [float(v) * scale for v in vals if v is not None and not pd.isna(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    m, lo, hi = bootstrap_ci(vals)
    return f"{fmt.format(m)} ± {fmt.format((hi - lo) / 2)}"


def kernel_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows: method variant, the passes its runs timed and impl; columns: forward (and, where
    measured, backward) latency per length (beside it the index step's ms for methods that record
    ``metric.index_ms``), and fidelity, peak memory, useful TFLOP/s (the
    FLOPs of the work the method must do, ``cost.flops``, over its forward time) and speedup
    over dense at the summary length: the longest length that at least half of the rows
    reached (a 1M-token run of a few methods does not empty the columns)."""
    df = labelled(df[df["runner"] == "kernel"])
    lens = sorted(int(t) for t in df["seq_len"].dropna().unique())
    if not lens:
        return pd.DataFrame()
    row_key = ["label", "timed", "impl"]
    n_rows = len(df[row_key].drop_duplicates())
    reached = {t: len(df.loc[df["seq_len"] == t, row_key].drop_duplicates()) for t in lens}
    tmax = max(t for t in lens if 2 * reached[t] >= n_rows)
    if "cost.flops" in df and "latency.forward.p50" in df:  # FLOPs of the work the method must do, over time
        df["useful_tflops"] = df["cost.flops"] / df["latency.forward.p50"] / 1e9
    else:
        df["useful_tflops"] = None
    bwd = df["latency.backward.p50"].notna() if "latency.backward.p50" in df else pd.Series(False, df.index)
    bwd_lens = sorted(int(t) for t in df.loc[bwd, "seq_len"].unique())
    idx = df["metric.index_ms"].notna() if "metric.index_ms" in df else pd.Series(False, df.index)
    idx_lens = sorted(int(t) for t in df.loc[idx, "seq_len"].unique())  # methods that time their index
    dense = df[(df["method"] == BASELINE) & (df["status"] == "ok")]
    dense = dense[dense["impl"] != "reference"] if (dense["impl"] != "reference").any() else dense
    auto = dense["method_params"].apply(lambda p: isinstance(p, dict) and p.get("backend", "auto") == "auto")
    dense = dense[auto] if auto.any() else dense  # the default backend: PyTorch's fastest
    base = (dense.groupby("seq_len")["latency.forward.p50"].mean().to_dict()
            if "latency.forward.p50" in dense else {})
    rows = []
    for (label, timed, impl), g in df.groupby(row_key, sort=True):
        by_len: dict[int, list] = {}
        for _, r in g.iterrows():  # several seeds of one length: mean and bootstrap interval
            if pd.notna(r["seq_len"]):
                by_len.setdefault(int(r["seq_len"]), []).append(r)
        last = by_len.get(tmax)
        row = {"method": label, "impl": impl, "timed": timed,
               "real kernel": "yes" if g["real_kernel"].all() else "no"}
        row["rel err (random)"] = _cell(last, "metric.rel_err_random", "{:.3f}")
        row["rel err (structured)"] = _cell(last, "metric.rel_err_structured", "{:.3f}")
        for t in lens:
            row[f"fwd ms @{t}"] = _cell(by_len.get(t), "latency.forward.p50", "{:.3f}")
            if t in idx_lens:  # the index step's share of the forward, beside it
                row[f"index ms @{t}"] = _cell(by_len.get(t), "metric.index_ms", "{:.3f}")
        for t in bwd_lens:  # backward timings, at the lengths some run has them
            row[f"bwd ms @{t}"] = _cell(by_len.get(t), "latency.backward.p50", "{:.3f}")
        row[f"peak MiB @{tmax}"] = _cell(last, "mem.forward", "{:.1f}", scale=2.0**-20)
        row[f"density @{tmax}"] = _cell(last, "cost.density", "{:.3f}")
        row[f"useful TFLOP/s @{tmax}"] = _cell(last, "useful_tflops", "{:.3g}")
        sp = "-"
        if last and all(r["status"] == "ok" for r in last) and tmax in base:
            p50 = sum(r["latency.forward.p50"] for r in last) / len(last)
            sp = f"{base[tmax] / p50:.2f}x"
        row[f"speedup @{tmax}"] = sp
        rows.append(row)
    return pd.DataFrame(rows)


def budget_table(df: pd.DataFrame) -> pd.DataFrame:
    """Equal-budget runs (runner=kernel with ``runner.target_density``: methods.budget): one row
    per method, impl and length; per target density, the quality at that budget (relative error
    on the structured and random inputs) and the density the fitted knob achieved."""
    if "metric.target_density" not in df:
        return pd.DataFrame()
    df = df[(df["runner"] == "kernel") & df["metric.target_density"].notna()]
    if df.empty:
        return pd.DataFrame()
    targets = sorted(float(t) for t in df["metric.target_density"].unique())
    rows = []
    for (method, impl, T), g in df.groupby(["method", "impl", "seq_len"], sort=True):
        row = {"method": method, "impl": impl, "len": int(T)}
        for t in targets:
            at = [r for _, r in g[g["metric.target_density"] == t].iterrows()] or None
            pct = f"{100 * t:g}%"
            row[f"rel err @{pct}"] = _cell(at, "metric.rel_err_structured", "{:.3f}")
            row[f"rel err (random) @{pct}"] = _cell(at, "metric.rel_err_random", "{:.3f}")
            row[f"density @{pct}"] = _cell(at, "metric.density_achieved", "{:.3f}")
        rows.append(row)
    return pd.DataFrame(rows)


def efficiency_lengths(df: pd.DataFrame) -> pd.DataFrame:
    """The efficiency length of each method, as the CAB benchmark defines it: the shortest
    measured sequence length at which it is faster than dense attention (forward p50) and
    the shortest at which it needs less memory ("> T" when it never does up to the longest
    length measured)."""
    df = df[(df["runner"] == "kernel") & (df["status"] == "ok")]
    if df.empty:
        return pd.DataFrame()
    df = labelled(df)
    dense = df[(df["method"] == BASELINE) & (df["impl"] != "reference")]
    auto = dense["method_params"].apply(lambda p: isinstance(p, dict) and p.get("backend", "auto") == "auto")
    dense = dense[auto] if auto.any() else dense
    t_base = dense.set_index("seq_len")["latency.forward.p50"].to_dict()
    m_base = dense.set_index("seq_len")["mem.forward"].to_dict() if "mem.forward" in dense else {}
    rows = []
    for (label, timed, impl), g in df[df["method"] != BASELINE].groupby(["label", "timed", "impl"]):
        g = g.sort_values("seq_len")
        rows.append({"method": label, "impl": impl, "timed": timed,
                     "faster from": _first_below(g, "latency.forward.p50", t_base),
                     "leaner from": _first_below(g, "mem.forward", m_base)})
    return pd.DataFrame(rows)


def _first_below(g: pd.DataFrame, col: str, base: dict) -> str:
    """The shortest length of ``g`` (sorted by length) whose ``col`` is below the baseline's."""
    for _, r in g.iterrows():
        t = int(r["seq_len"])
        if t in base and pd.notna(r.get(col)) and r[col] < base[t]:
            return str(t)
    return f"> {int(g['seq_len'].max())}"


LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")


def per_task_settings(df: pd.DataFrame) -> pd.Series:
    """The setting label (``setting_labels``) of each record among the records of its task:
    a smoke run and a full run of one task are rows of their own, never one cell."""
    out = pd.Series("", index=df.index, dtype=object)
    for _, g in df.groupby("task", dropna=False):
        out.loc[g.index] = setting_labels(g)
    return out


def lra_table(df: pd.DataFrame) -> pd.DataFrame:
    """The LRA table: test accuracy (%) per method (rows) and task (columns) from training
    records, with the average over the tasks (only for rows that finished every task that any
    row finished: averages over different tasks do not compare); over several seeds "mean ± half-width of
    the 95% bootstrap interval" (``_cell``: the newest record of each seed); a failed run shows
    its status, a task not run shows "-" (runs of one task that differ in a setting that changes
    the result, e.g. steps or batch size, are rows of their own, named by it)."""
    df = df[(df["runner"] == "train") & df["task"].astype(str).str.startswith("lra/")].copy()
    if df.empty:
        return pd.DataFrame()
    df["label"] = with_setting(variants(df), per_task_settings(df))
    ran = {t for t in LRA_TASKS if ((df["task"] == f"lra/{t}") & (df["status"] == "ok")).any()}
    rows = []
    for label, g in df.groupby("label", sort=True):
        row, accs = {"method": label}, {}
        for t in LRA_TASKS:
            r = g[g["task"] == f"lra/{t}"].sort_values("time", kind="stable")
            if r.empty:
                row[t] = "-"
                continue
            seeds = [x for _, x in r.groupby("seed", dropna=False, sort=True).tail(1).iterrows()]
            row[t] = _cell(seeds, "metric.test_acc", "{:.2f}", 100)
            if all(x["status"] == "ok" for x in seeds):
                accs[t] = 100 * sum(float(x["metric.test_acc"]) for x in seeds) / len(seeds)
        row["seeds"] = ",".join(str(int(x)) for x in sorted(g["seed"].dropna().unique()))
        # over the same tasks for every row: those any run of the table finished
        row["avg"] = f"{sum(accs.values()) / len(accs):.2f}" if accs and set(accs) == ran else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def ruler_table(store) -> pd.DataFrame:
    """RULER-like scores (%): one row per method, one column per task and length, and the
    average (the newest ok record of each method)."""
    from runners import records as rs

    rows = []
    recs = [r for r in rs.read(store) if r.get("task") == "ruler" and r.get("status") == "ok"]
    for r in sorted(recs, key=lambda r: r["time"]):
        row = {"method": r["method"] + "".join(f" {k}={v}" for k, v in r["method_params"].items()
                                                if k in ("pattern", "window"))}
        for c in r["metrics"]["cells"]:
            row[f"{c['task']} @{c['length']}"] = f"{100 * c['score']:.1f}"
        row["avg"] = f"{100 * r['metrics']['average']:.1f}"
        rows = [x for x in rows if x["method"] != row["method"]] + [row]
    return pd.DataFrame(rows)


def needle_cells(store) -> dict[str, list]:
    """The needle grid of each method's newest ok record: {label: cells}."""
    from runners import records as rs

    out = {}
    for r in sorted(rs.read(store), key=lambda r: r["time"]):
        if r.get("task") == "needle" and r.get("status") == "ok":
            label = r["method"] + "".join(f"-{r['method_params'][k]}" for k in ("pattern",)
                                          if k in r["method_params"])
            out[label] = r["metrics"]["cells"]
    return out


def settings(df: pd.DataFrame, runner: str = "kernel"):
    """(title, sub-frame) per (device/gpu, dtype, causal, attention shape) setting of kernel
    records (or of another runner's: ``decode``) (the shape, e.g. ``H=32 Hkv=32 D=64``, is
    named where the records hold it)."""
    df = df[df["runner"] == runner].copy()
    if df.empty:
        return
    df["where"] = df["gpu"].fillna(df["device"])
    if "shape" not in df:
        df["shape"] = None
    for (where, dtype, causal, shape), g in df.groupby(["where", "dtype", "causal", "shape"], dropna=False):
        shape = "" if pd.isna(shape) else f", {shape}"
        title = f"{where}, {dtype}, {'causal' if causal else 'non-causal'}{shape}"
        # runs that differ in another setting (warm-up, repeats, batch, the task's inputs: a smoke
        # run beside a full one) are tables of their own, each with its own dense baseline
        for setting, part in g.groupby(setting_labels(g), sort=True):
            yield (f"{title} [{setting}]" if setting else title), part


def real_model_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method (label and impl) of the runs inside a pretrained model
    (runner=pretrained): perplexity, needle accuracy per length, real-attention fidelity and
    recall, prefill latency and peak memory; dense first. A task that failed shows its reason
    (a method that cannot attend causally: ``not causal``)."""
    df = df[df["runner"] == "pretrained"]
    if df.empty:
        return pd.DataFrame()
    df = df.assign(label=with_setting(variants(df), per_task_settings(df))).sort_values("time", kind="stable")
    needle_cols = sorted((c for c in df if c.startswith("metric.needle@")), key=lambda c: int(c.split("@")[1]))
    rows = []
    for (label, impl), g in df.groupby(["label", "impl"], sort=False):
        row = {"method": label, "impl": impl}

        def task(name, g=g):
            t = g[g["task"] == name]
            return None if t.empty else t.iloc[-1]

        def value(r, col, fmt):
            if r is None:
                return "-"
            if r["status"] != "ok":
                err = str(r["error"] or r["status"])
                return "not causal" if "causal" in err else f"failed: {err[:40]}"
            v = r.get(col)
            return "-" if v is None or pd.isna(v) else fmt.format(v)

        ppl, ndl, fid = task("perplexity"), task("needle"), task("fidelity")
        row["ppl"] = value(ppl, "metric.perplexity", "{:.2f}")
        for c in needle_cols:
            row[f"needle {c.split('@')[1]}"] = value(ndl, c, "{:.0%}")
        row["real rel err"] = value(fid, "metric.real_rel_err", "{:.3f}")
        row["recall"] = value(fid, "metric.recall", "{:.3f}")
        row["density"] = value(fid, "metric.recall_density", "{:.3f}")
        row["prefill ms"] = value(ppl, "latency.prefill.p50", "{:.0f}")
        row["peak MB"] = value(ppl, "mem.prefill", "{:.0f}") if ppl is None or pd.isna(ppl.get("mem.prefill")) \
            else f"{ppl['mem.prefill'] / 2**20:.0f}"
        rows.append(row)
    out = pd.DataFrame(rows)
    order = out["method"].astype(str).str.startswith("dense").map({True: 0, False: 1})
    return out.assign(_o=order).sort_values(["_o", "method"], kind="stable").drop(columns="_o").reset_index(drop=True)


def decode_table(df: pd.DataFrame) -> pd.DataFrame:
    """runner=decode records of one setting: a row per method variant, impl and prefill length L
    (dense first): the decode path (``dense fallback`` where the method has none of its own),
    the step latency p50 and p99 (index + attention), the selection share (index time, i.e.
    append and select, over the step, at p50), the bytes a step read and the share of dense
    decode's, the KV bytes held at the end, the attention recall (dense probability mass on
    the keys read) and the fidelity (relative error against dense decode), means over the
    steps; seeds averaged (``_cell``)."""
    df = labelled(df[df["runner"] == "decode"])
    if df.empty:
        return pd.DataFrame()
    df = df.copy()
    for c in ("latency.decode_index.p50", "latency.decode_step.p50"):
        if c not in df:
            df[c] = None
    df["selection_share"] = pd.to_numeric(df["latency.decode_index.p50"], errors="coerce") / pd.to_numeric(
        df["latency.decode_step.p50"], errors="coerce")
    cols = [("step p50 ms", "latency.decode_step.p50", "{:.3f}", 1.0),
            ("step p99 ms", "latency.decode_step.p99", "{:.3f}", 1.0),
            ("selection share", "selection_share", "{:.0%}", 1.0),
            ("KiB read / step", "metric.bytes_read_per_step", "{:.1f}", 1 / 1024),
            ("read fraction", "metric.read_fraction", "{:.3f}", 1.0),
            ("KiB held", "metric.kv_bytes_held_end", "{:.1f}", 1 / 1024),
            ("recall", "metric.decode_recall_mean", "{:.3f}", 1.0),
            ("rel err", "metric.decode_rel_err_mean", "{:.2e}", 1.0)]
    rows = []
    for (label, impl, L), g in df.groupby(["label", "impl", "seq_len"], sort=True):
        recs = [r for _, r in g.iterrows()]
        path = next((r["decode_path"] for r in recs if isinstance(r.get("decode_path"), str)), "-")
        if any(r.get("decode_fallback") == "dense" for r in recs):
            path += " (dense fallback)"
        row = {"method": label, "impl": impl, "L": int(L), "decode path": path}
        for name, col, fmt, scale in cols:
            row[name] = _cell(recs, col, fmt, scale) if col in g else "-"
        rows.append(row)
    out = pd.DataFrame(rows)
    order = out["method"].astype(str).str.startswith(BASELINE).map({True: 0, False: 1})
    return out.assign(_o=order).sort_values(["_o", "method", "impl", "L"], kind="stable").drop(
        columns="_o").reset_index(drop=True)


def failures_table(df: pd.DataFrame, skipped: bool = False) -> pd.DataFrame:
    """Every record that failed (status error, oom, failed_correctness), with its reason in
    full: what ran, where, and why (the tables show the status and the start of the reason).
    ``skipped=True``: the records deliberately not run instead (status skipped, "not run: ..."
    with the reason: data absent, no budget knob, forward is dense attention), which are not
    failures."""
    if "status" not in df:
        return pd.DataFrame()
    bad = df[df["status"] == "skipped"] if skipped else df[~df["status"].isin(["ok", "skipped"])]
    rows = [{"method": r["method"], "impl": r["impl"], "runner": r["runner"], "task": r["task"],
             "length": "-" if pd.isna(r["seq_len"]) else int(r["seq_len"]), "device": r["device"],
             "status": r["status"], "reason": " ".join(str(r["error"] or "-").replace("|", "/").split())[:300]}
            for _, r in bad.sort_values("time", kind="stable").iterrows()]
    return pd.DataFrame(rows)


def tables(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, table) of every leaderboard table the records allow."""
    out = []
    real = real_model_table(df)
    if not real.empty:
        models = ", ".join(sorted(df.loc[df["runner"] == "pretrained", "model"].dropna().unique()))
        out.append((f"Inside a pretrained model ({models}), real text", real))
    lra = lra_table(df)
    if not lra.empty:
        out.append(("Long Range Arena, test accuracy (%)", lra))
    for title, g in settings(df):
        out.append((title, kernel_table(g)))
    for title, g in settings(df, "decode"):
        out.append((f"Decode: {title}", decode_table(g)))
    budget = budget_table(df)
    if not budget.empty:
        out.append(("Equal budget: quality at a target density", budget))
    for title, t in (("Failed runs", failures_table(df)), ("Not run", failures_table(df, skipped=True))):
        if not t.empty:
            out.append((title, t))
    return out




def method_table(conf_dir) -> pd.DataFrame:
    """One row per method of the registry (``<conf_dir>/method/*.yaml`` and the class its
    ``_target_`` names): name, paper, kind, causal support, implementations, defaults (the
    YAML's hyperparameters) and the test that shows it matches the authors' code."""
    from pathlib import Path

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    rows = []
    for path in sorted(Path(conf_dir, "method").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        cls = get_class(cfg["_target_"])
        causal = {(True, True): "both", (True, False): "only", (False, True): "no"}[
            (cls.supports_causal, cls.supports_noncausal)]
        defaults = ", ".join(f"`{k}` {v}" for k, v in cfg.items() if not k.startswith("_") and k != "impl")
        rows.append({"method": f"`{path.stem}`", "paper": cls.paper or "-", "kind": cls.kind,
                     "causal": causal, "impls": ", ".join(cls.impls), "default impl": cfg.get("impl", "-"),
                     "hyperparameters (defaults)": defaults,
                     "matches official code": f"`{cls.official_test}`" if cls.official_test else "no test yet"})
    return pd.DataFrame(rows)
