"""The prefill-sparsity table (issue 25) from the records of ``scripts/prefill_table.sh``:

  kernel records (runner=kernel, SmolLM2's head layout, one per method and length): index time,
      attention time and their total (forward p50), the total against dense (cuDNN SDPA) at
      the same length, density, and attention recall on the structured inputs of that length
  real records (runner=pretrained, SmolLM2-135M at 8k): perplexity, needle accuracy, RULER-like
      accuracy (at the shorter lengths where the dense model answers some of it), attention
      recall and density on q/k/v captured from the model on prose, the model's prefill time
      and the index time of its layers summed

One table per length (the 8k table carries the real-model columns), and a figure of recall
against total time per length with the Pareto front (nothing both faster and of higher recall)
marked: at 8k the recall on SmolLM2's captured q/k/v where the method has it, else (and at 32k
and 128k) the recall on the structured inputs; dense sits at recall 1.

    python -m analysis.prefill --kernel results/prefill/kernel.jsonl --real results/prefill/real.jsonl \
        --out results/prefill
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.records import failure, load

BASELINE = "dense"
# the hyperparameters that make two rows of one method different operating points in this table
DISTINCT = {"seer_attention": ("selection",), "minference": ("pattern",)}
NOTE = """index ms: the method's index step (blocks, stripes, gate, selection), timed in one more synced
call; attention ms: the forward p50 less the index time; total ms: the forward p50 (the timed calls
do not sync between the two steps); x dense: total / dense's total at the same length (below 1 is
faster); density: share of the causal pairs computed (as the running path counts them); recall:
share of dense attention mass on the keys the method computes, on the fidelity task's structured
inputs at that length (query rows sampled); real: on q/k/v captured from SmolLM2-135M on prose
(layers 0, 10, 20, 29); ppl, needle, ruler: inside SmolLM2-135M (all 30 layers through the method;
ruler: RULER-like NIAH tasks, mean over the lengths run, 2000 and 4000 tokens on the GPU);
model prefill ms: one forward of the model; model index ms: the index steps of its 30 layers in
one forward, summed (synced)."""


def label(method: str, params) -> str:
    """``method`` and the values of its DISTINCT hyperparameters (``seer_attention selection=topk``)."""
    params = params if isinstance(params, dict) else {}
    keys = DISTINCT.get(method, ())
    extra = " ".join(f"{k}={params[k]}" for k in keys if k in params)
    return f"{method} {extra}".strip()


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    df = df.assign(label=[label(m, p) for m, p in zip(df["method"], df["method_params"])])
    return df.sort_values("time", kind="stable")


def _fmt(v, fmt: str) -> str:
    return "-" if v is None or pd.isna(v) else fmt.format(v)


def kernel_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, length) of the kernel records (the newest), with the numbers of the
    table as floats (NaN where absent) and ``status`` (``ok`` or the failure)."""
    df = _rows(df[df["runner"] == "kernel"]) if len(df) else df
    if df.empty:
        return pd.DataFrame(columns=["label", "impl", "seq_len", "status", "index_ms", "attention_ms",
                                     "total_ms", "vs_dense", "density", "recall"])
    df = df.drop_duplicates(["label", "seq_len"], keep="last")
    out = []
    for _, r in df.iterrows():
        total = r.get("latency.forward.p50")
        dens = r.get("metric.density_measured")
        if dens is None or pd.isna(dens):
            dens = r.get("cost.density")
        impl = r["impl"]
        if r["method"] == BASELINE and isinstance(r.get("backend"), str):
            impl = r["backend"]  # the SDPA backend that ran (sdpa:cudnn_attention)
        out.append({"label": r["label"], "method": r["method"], "impl": impl, "seq_len": int(r["seq_len"]),
                    "status": failure(r["status"], r["error"]),
                    "index_ms": r.get("metric.index_ms"), "attention_ms": r.get("metric.attention_ms"),
                    "total_ms": total, "density": dens, "recall": r.get("metric.recall"),
                    "hardness": {k[len("metric.hardness_"):]: r[k] for k in r.index
                                 if k.startswith("metric.hardness_") and pd.notna(r[k])}})
    out = pd.DataFrame(out)
    for c in ("index_ms", "attention_ms", "total_ms", "density", "recall"):
        out[c] = pd.to_numeric(out[c], errors="coerce")
    dense = out[out["method"] == BASELINE].set_index("seq_len")["total_ms"]
    out["vs_dense"] = [t / dense[n] if n in dense.index and dense[n] > 0 else float("nan")
                       for t, n in zip(out["total_ms"], out["seq_len"])]
    dense_rows = out["method"] == BASELINE
    out.loc[dense_rows & out["recall"].isna() & (out["status"] == "ok"), "recall"] = 1.0  # exact: all the mass
    out.loc[dense_rows & out["density"].isna() & (out["status"] == "ok"), "density"] = 1.0
    return out


def real_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per label of the runner=pretrained records: ppl, needle (mean over the lengths
    run), real recall and density, model prefill and index ms; failures by task."""
    df = _rows(df[df["runner"] == "pretrained"]) if len(df) else df
    cols = ["label", "ppl", "needle", "ruler", "real_recall", "real_density", "model_prefill_ms", "model_index_ms",
            "real_status"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    needle_cols = [c for c in df if c.startswith("metric.needle@")]
    ruler_cols = [c for c in df if c.startswith("metric.ruler@")]
    out = []
    for lab, g in df.groupby("label", sort=False):
        row, bad = {"label": lab}, []

        def last(task, g=g, bad=bad):
            t = g[g["task"] == task]
            if t.empty:
                return None
            r = t.iloc[-1]
            if r["status"] != "ok":
                bad.append(f"{task}: {failure(r['status'], r['error'])}")
                return None
            return r

        ppl, ndl, fid, rul = last("perplexity"), last("needle"), last("fidelity"), last("ruler")
        row["ppl"] = None if ppl is None else ppl.get("metric.perplexity")
        row["model_prefill_ms"] = None if ppl is None else ppl.get("latency.prefill.p50")
        row["model_index_ms"] = None if ppl is None else ppl.get("metric.index_ms")
        row["needle"] = (None if ndl is None or not needle_cols
                         else pd.to_numeric(ndl[needle_cols], errors="coerce").mean())
        row["ruler"] = (None if rul is None or not ruler_cols  # mean over the RULER lengths run
                        else pd.to_numeric(rul[ruler_cols], errors="coerce").mean())
        row["real_recall"] = None if fid is None else fid.get("metric.recall")
        row["real_density"] = None if fid is None else fid.get("metric.recall_density")
        if fid is not None and lab == BASELINE:
            row["real_recall"], row["real_density"] = 1.0, 1.0  # exact attention
        row["real_status"] = "; ".join(bad) or "ok"
        out.append(row)
    out = pd.DataFrame(out, columns=cols)
    for c in cols[1:-1]:
        out[c] = pd.to_numeric(out[c], errors="coerce")
    return out


def hardness_line(kernel: pd.DataFrame, n: int) -> str:
    """The hardness parameters the records carry at length ``n`` (HyperAttention's alpha and
    kappa on the timed inputs, paper Sec. 1.1), one line; "" where none does."""
    g = kernel[(kernel["seq_len"] == n) & kernel["hardness"].map(bool)] if "hardness" in kernel else kernel[:0]
    if g.empty:
        return ""
    each = [f"{r['label']}: " + ", ".join(f"{k} = {v:.3g}" for k, v in sorted(r["hardness"].items()))
            for _, r in g.iterrows()]
    return "Hardness of these inputs (the method's own diagnostic, exact): " + "; ".join(each) + "."


def tables(kernel: pd.DataFrame, real: pd.DataFrame) -> list[tuple[int, pd.DataFrame]]:
    """[(length, markdown-ready table)], dense first; the shortest length carries the real-model
    columns (the records' 8k)."""
    out = []
    lengths = sorted(kernel["seq_len"].unique()) if len(kernel) else []
    for i, n in enumerate(lengths):
        g = kernel[kernel["seq_len"] == n]
        g = g.assign(_o=(g["method"] != BASELINE).astype(int)).sort_values(["_o", "label"]).drop(columns="_o")
        rows = []
        for _, r in g.iterrows():
            row = {"method": r["label"], "impl": r["impl"], "index ms": _fmt(r["index_ms"], "{:.2f}"),
                   "attention ms": _fmt(r["attention_ms"], "{:.2f}"), "total ms": _fmt(r["total_ms"], "{:.2f}"),
                   "x dense": _fmt(r["vs_dense"], "{:.2f}"), "density": _fmt(r["density"], "{:.3f}"),
                   "recall": _fmt(r["recall"], "{:.3f}")}
            if i == 0 and len(real):
                m = real[real["label"] == r["label"]]
                m = m.iloc[0] if len(m) else None

                def get(c, f, m=m):
                    return "-" if m is None else _fmt(m.get(c), f)

                row.update({"real recall": get("real_recall", "{:.3f}"), "real density": get("real_density", "{:.3f}"),
                            "ppl": get("ppl", "{:.2f}"), "needle": get("needle", "{:.0%}"),
                            "ruler": get("ruler", "{:.0%}"),
                            "model prefill ms": get("model_prefill_ms", "{:.0f}"),
                            "model index ms": get("model_index_ms", "{:.1f}")})
                if m is not None and m["real_status"] != "ok":
                    row["status"] = m["real_status"]
            if r["status"] != "ok":
                row["status"] = "; ".join(x for x in (r["status"], row.get("status")) if x)
            rows.append(row)
        t = pd.DataFrame(rows)
        if "status" in t:
            t["status"] = t["status"].fillna("ok")
        out.append((int(n), t))
    return out


def points(kernel: pd.DataFrame, real: pd.DataFrame, n: int, real_len: int | None) -> pd.DataFrame:
    """(label, impl, ms, recall, source) of the ok kernel rows at length ``n``; at ``real_len``
    the recall on the real q/k/v where the method has one."""
    g = kernel[(kernel["seq_len"] == n) & (kernel["status"] == "ok")].copy()
    g["source"] = "structured"
    if n == real_len and len(real):
        rr = real.set_index("label")["real_recall"]
        have = g["label"].map(rr)
        g.loc[have.notna(), "recall"] = have[have.notna()]
        g.loc[have.notna(), "source"] = "real"
    return g.dropna(subset=["total_ms", "recall"]).reset_index(drop=True)


def figure(kernel: pd.DataFrame, real: pd.DataFrame, path) -> Path:
    """Recall against total time, one panel per length, the Pareto front starred and stepped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import _save, pareto_front

    lengths = sorted(kernel["seq_len"].unique())
    if not lengths:
        raise ValueError("no kernel records to draw")
    labels = sorted(set(kernel["label"]) - {BASELINE})
    cmap = plt.get_cmap("tab20")
    colour = {**{lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}, BASELINE: "black"}
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths), 4.6), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        pts = points(kernel, real, n, lengths[0])
        front = set(pareto_front([(r["total_ms"], -r["recall"]) for _, r in pts.iterrows()]))
        for i, r in pts.iterrows():
            ax.scatter(r["total_ms"], r["recall"], s=110 if i in front else 45, marker="*" if i in front else
                       ("o" if r["source"] == "real" else "s"), color=colour.get(r["label"], "grey"),
                       label=f"{r['label']} ({r['impl']})", zorder=3)
        fx = sorted((pts.loc[i, "total_ms"], pts.loc[i, "recall"]) for i in front)
        if fx:
            ax.step([p[0] for p in fx], [p[1] for p in fx], where="post", color="grey", ls="--", lw=1,
                    label="Pareto front")
        src = "real q/k/v (SmolLM2) where measured" if n == lengths[0] and len(real) else "structured inputs"
        ax.set_title(f"{n} tokens: recall on {src}", fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("attention forward, index + attention (ms)")
        ax.set_ylabel("attention recall")
        ax.grid(True, which="both", alpha=0.3)
    handles, names = {}, []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                names.append(lab)
    fig.legend([handles[x] for x in names], names, fontsize=7, loc="lower center", ncol=4)
    rows = -(-len(names) // 4)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    return _save(fig, path)


def report(kernel_store, real_store, out_dir) -> list[Path]:
    """table.md and recall_vs_time.png in ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kdf = load(kernel_store) if Path(kernel_store).exists() else pd.DataFrame()
    rdf = load(real_store) if real_store and Path(real_store).exists() else pd.DataFrame()
    kernel, real = kernel_rows(kdf), real_rows(rdf)
    if kernel.empty and not real.empty:  # a real-model part alone (e.g. PART=ruler): its table only
        env = rdf[["device", "dtype"]].drop_duplicates().astype(str).agg(", ".join, axis=1).tolist()
        t = real.assign(**{c: real[c].map(lambda v, f=f: _fmt(v, f)) for c, f in (
            ("ppl", "{:.2f}"), ("needle", "{:.0%}"), ("ruler", "{:.0%}"), ("real_recall", "{:.3f}"),
            ("real_density", "{:.3f}"), ("model_prefill_ms", "{:.0f}"), ("model_index_ms", "{:.1f}"))})
        t = t[[c for c in t if t[c].ne("-").any() or c in ("label", "real_status")]]  # columns with a value
        (out / "table.md").write_text(f"# Prefill methods inside SmolLM2-135M ({'; '.join(env)})\n\n"
                                      + t.to_markdown(index=False, disable_numparse=True) + "\n\n" + NOTE + "\n")
        return [out / "table.md"]
    if kernel.empty:
        raise ValueError(f"no runner=kernel records in {kernel_store}")
    shape = kdf["shape"].dropna().unique()
    gpu = kdf["gpu"].dropna().unique() if "gpu" in kdf else []
    parts = [f"# Prefill sparsity: index, attention, density, recall ({', '.join(map(str, shape))}; "
             f"{', '.join(map(str, gpu)) or kdf['device'].iloc[0]}, {kdf['dtype'].iloc[0]})"]
    for n, t in tables(kernel, real):
        parts.append(f"## {n} tokens\n\n" + t.to_markdown(index=False, disable_numparse=True))
        hard = hardness_line(kernel, n)
        if hard:
            parts.append(hard)
    parts.append(NOTE)
    (out / "table.md").write_text("\n\n".join(parts) + "\n")
    written = [out / "table.md"]
    try:
        written.append(figure(kernel, real, out / "recall_vs_time.png"))
    except ValueError as exc:
        print(f"prefill report: no figure ({exc})", file=sys.stderr)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", default="results/prefill/kernel.jsonl")
    ap.add_argument("--real", default="results/prefill/real.jsonl")
    ap.add_argument("--out", default="results/prefill")
    args = ap.parse_args(argv)
    for p in report(args.kernel, args.real, args.out):
        print(f"prefill report: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
