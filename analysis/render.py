"""Leaderboard tables (``analysis.tables``) rendered as markdown (best values in bold),
LaTeX, HTML or CSV."""
from __future__ import annotations

import html

import pandas as pd

from analysis.tables import (
    budget_table,
    decode_table,
    efficiency_lengths,
    failures_table,
    kernel_table,
    lra_table,
    real_model_table,
    settings,
    tables,
)

LOWER_BETTER = ("rel err", "fwd ms", "bwd ms", "peak MiB")
HIGHER_BETTER = ("speedup", "useful TFLOP/s", "listops", "text", "retrieval", "image", "pathfinder", "pathx", "avg")


WRAP = {"md": "**{}**", "latex": "\\textbf{{{}}}", "html": "<b>{}</b>"}


def lra_notes(df: pd.DataFrame) -> str:
    """What the LRA table's cells are read from, where it differs from LRA: the image data set
    of the records (Fashion-MNIST here, CIFAR-10 in LRA) and what its "not run" cells mean."""
    import json

    rows = df[df["task"].astype(str) == "lra/image"] if "task" in df else df.iloc[:0]
    sources = {json.loads(k or "{}").get("task.source") for k in rows.get("config_key", [])}
    notes = []
    if "fashion_mnist" in sources:
        notes.append("image: Fashion-MNIST (28 x 28 = 784 grayscale pixels, tasks/lra/image.py); the "
                     "original LRA Image task is CIFAR-10 (32 x 32 = 1024 pixels), not reachable here.")
    lra = df[df["task"].astype(str).str.startswith("lra/")] if "task" in df else df.iloc[:0]
    why = lra.loc[lra["status"] == "skipped", "error"].astype(str) if {"status", "error"} <= set(lra) \
        else pd.Series(dtype=str)
    if why.str.startswith("not run: data absent").any():
        notes.append("not run: data absent: the task's data is not on this machine (the records say "
                     "which file or command).")
    if why.str.startswith("not run: forward is dense attention").any():
        notes.append("not run: forward is dense attention: a KV-cache press or decode-time selector, whose "
                     "forward pass is dense attention, was not trained (runner.skip_dense_forward): its row "
                     "would be dense attention's.")
    return "".join(f"\n{n}\n" for n in notes)


def mark_best(table: pd.DataFrame, style: str = "md") -> pd.DataFrame:
    """Mark the best value of each column (lowest error, latency and memory; highest speedup
    and accuracy): **bold** in markdown, \\textbf in LaTeX, <b> in HTML."""
    if style == "none" or table.empty:
        return table
    out = table.copy()
    wrap = WRAP[style].format

    def num(x):
        try:
            return float(str(x).split()[0].rstrip("x"))
        except ValueError:
            return None

    for col in table.columns:
        low = col.startswith(LOWER_BETTER)
        if not (low or col.startswith(HIGHER_BETTER)):
            continue
        vals = {i: num(v) for i, v in table[col].items()}
        vals = {i: v for i, v in vals.items() if v is not None}
        if len(vals) < 2:
            continue
        best = min(vals.values()) if low else max(vals.values())
        for i, v in vals.items():
            if v == best:
                out.loc[i, col] = wrap(table.loc[i, col])
    return out


def render(df: pd.DataFrame, fmt: str = "md") -> str:
    """The leaderboard as markdown (with each setting's efficiency lengths), LaTeX, HTML or
    CSV; best values marked except in CSV."""
    if fmt == "md":
        return _markdown(df)
    parts = []
    for title, t in tables(df):
        if fmt == "csv":
            parts.append(f"# {title}\n" + t.to_csv(index=False))
        elif fmt == "latex":
            parts.append(f"% {title}\n" + mark_best(t, "latex").to_latex(index=False, escape=False))
        elif fmt == "html":
            parts.append(f"<h3>{html.escape(title)}</h3>\n"
                         + mark_best(t.map(lambda x: html.escape(str(x))), "html").to_html(index=False, escape=False))
        else:
            raise ValueError(f"unknown leaderboard format {fmt!r}: md, latex, html or csv")
    return "\n".join(parts)


def _markdown(df: pd.DataFrame) -> str:
    parts = []
    real = real_model_table(df)
    if not real.empty:
        models = ", ".join(sorted(df.loc[df["runner"] == "pretrained", "model"].dropna().unique()))
        parts.append(f"### Inside a pretrained model ({models}), real text\n\n"
                     + real.to_markdown(index=False, disable_numparse=True) + "\n\n"
                     "ppl: perplexity on held-out prose (tasks/corpora.py); needle N: greedy exact match "
                     "at N prompt tokens; real rel err, recall, density: on q/k/v captured from the "
                     "model on prose (recall: dense attention mass on the keys the method computes); "
                     "prefill: one forward pass at the perplexity length.\n")
    lra = lra_table(df)
    if not lra.empty:
        parts.append("### Long Range Arena, test accuracy (%)\n\n"
                     + mark_best(lra).to_markdown(index=False, disable_numparse=True) + "\n"
                     + lra_notes(df))
    for title, g in settings(df):
        table = mark_best(kernel_table(g)).to_markdown(index=False, disable_numparse=True)
        parts.append(f"### {title}\n\n{table}\n")
        eff = efficiency_lengths(g)
        if not eff.empty:
            parts.append("Efficiency length (shortest length at which the method beats dense attention):\n\n"
                         + eff.to_markdown(index=False, disable_numparse=True) + "\n")
    for title, g in settings(df, "decode"):
        parts.append(f"### Decode: {title}\n\n" + decode_table(g).to_markdown(index=False, disable_numparse=True)
                     + "\n\n" + DECODE_NOTE)
    budget = budget_table(df)
    if not budget.empty:
        parts.append("### Equal budget: quality at a target density\n\n"
                     + mark_best(budget).to_markdown(index=False, disable_numparse=True) + "\n\n"
                     "Each method's budget knob fitted per length to the target density on the timed "
                     "inputs (methods/budget.py); rel err on the fidelity task's structured (and random) "
                     "inputs at that budget; density: what the fitted knob achieved.\n")
    for title, t in (("Failed runs", failures_table(df)), ("Not run", failures_table(df, skipped=True))):
        if not t.empty:
            parts.append(f"### {title} ({len(t)})\n\n" + t.to_markdown(index=False, disable_numparse=True) + "\n")
    return "\n".join(parts) if parts else NO_RECORDS


DECODE_NOTE = ("runner=decode: prefill L tokens, then decode steps; step = index (append + select) + attention, "
               "timed apart; selection share = index / step at p50; read fraction: bytes read over dense "
               "decode's; recall: dense attention mass on the keys read (- for a recurrent state, which "
               "reads no key); rel err: against dense decode over the same history.\n")
NO_RECORDS = "(no records: the store is empty; run `attnbench` or `make run` first)\n"
