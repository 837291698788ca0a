"""results/mqar/ from the MQAR records (scripts/mqar_table.sh): table.md (one row per method:
test and validation recall accuracy, the attention's recurrent state in bytes per sequence,
whether it stays constant with length, steps, training time; failures with their error, and
the methods asked for without a record as "not run") and recall_vs_state.png (test accuracy
against state bytes, log scale; the newest record of each method).

    python scripts/mqar_report.py --store results/mqar/records.jsonl --methods a,b --out results/mqar

Several ``--store`` files (e.g. a GPU sweep and CPU runs of the methods it did not reach) make one
table, the newest record of each method counting, with the device of each row; their records
must share the task, model and step budget (an error names the difference otherwise).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def newest(*stores: Path) -> dict:
    """The newest MQAR record of each method over ``stores`` (``runners.records.read``)."""
    from runners import records

    recs = {}
    for r in sorted((r for store in stores for r in records.read(store) if r.get("task") == "mqar"),
                    key=lambda r: str(r.get("time", ""))):
        recs[r["method"]] = r  # in time order: the last one wins
    return recs


def device_of(r: dict) -> str:
    return (r.get("env") or {}).get("gpu") or str(r.get("device") or "?")


def setting_key(r: dict) -> tuple:
    """What a row's result depends on besides the method and device: the task's size, the model
    and the steps asked for."""
    c = r.get("config") or {}
    task, model, runner = c.get("task") or {}, c.get("model") or {}, c.get("runner") or {}
    return (task.get("num_kv_pairs"), task.get("max_len"), task.get("vocab_size"), model.get("depth"),
            model.get("dim"), runner.get("steps"), runner.get("target_density"))


def dense_forward(method: str) -> str:
    """Why a method's MQAR forward pass is dense attention, or "" (``methods.dense_forward``):
    their row measures dense attention."""
    import methods
    from methods.dense_forward import dense_forward

    try:
        return dense_forward(str(methods.compose_method(method)["_target_"]))
    except ValueError:  # not a method of conf/method (a record from elsewhere)
        return ""


def density_at_length(r: dict) -> float | None:
    """The share of causal query-key pairs the record's method attends at the task's length
    (``last_density`` after one forward of its ``reference`` path on random inputs, the record's
    method settings and heads; None where it has none or fails): 1.0 (or more, for methods whose
    branches overlap) means that, at this length, the method is dense attention and its row
    measures dense attention. The reference path counts pairs; a FlexAttention path counts
    blocks of 128, which a short sequence fills."""
    import torch

    import methods

    c = r.get("config") or {}
    model, task = c.get("model") or {}, c.get("task") or {}
    try:
        T, H, D = int(task["max_len"]), int(model["heads"]), int(model["head_dim"])
        cfg = dict(c["method"])
        if "impl" in cfg:
            cfg["impl"] = "reference"
        m = methods.build(cfg, num_heads=H, head_dim=D, max_seq_len=T,
                          num_kv_heads=int(model.get("num_kv_heads") or H))
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, T, D, generator=g) for _ in range(3))
        with torch.no_grad():
            m(q, k, v, causal=True)
        d = getattr(m, "last_density", None)
        return None if d is None else float(d)
    except Exception:  # noqa: BLE001 - a method that cannot run here shows no density, not a failure
        return None


def rows(recs: dict, wanted: list[str]) -> list[dict]:
    out = []
    for m in wanted + sorted(set(recs) - set(wanted)):
        r = recs.get(m)
        if r is None:
            out.append({"method": m, "status": "not run (no record: out of the budget or not reached)"})
            continue
        met, tr = r.get("metrics") or {}, r.get("train") or {}
        out.append({"method": m, "status": r["status"] if r["status"] != "ok" else "ok",
                    "test_acc": met.get("test_acc"), "val_acc": met.get("val_acc"),
                    "state_bytes": met.get("state_bytes"), "state_constant": met.get("state_constant"),
                    "steps": tr.get("steps"), "wall_s": tr.get("wall_s"),
                    "error": (r.get("error") or "")[:120], "forward": dense_forward(m), "device": device_of(r),
                    "density": met["density_achieved"] if "density_achieved" in met else
                    density_at_length(r) if r["status"] == "ok" else None})
    return out


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(rs: list[dict], setting: str) -> str:
    lines = [f"MQAR, {setting}. Test recall accuracy (answers only), the attention's recurrent state in bytes "
             "per sequence at the task's length (constant: the same at twice the length), training steps and time.",
             "The KV-cache presses and decode-time selectors train and answer here through their forward pass, "
             "which is dense attention (column `forward`): their rows measure dense attention, and their state "
             "bytes (the compressed cache) is not what answered.",
             "`density`: the share of causal pairs the method attends at the task's length (one forward of its "
             "reference path on random inputs with the record's settings): at 1.000 or more the method is dense "
             "attention at this length, and its row measures dense attention.",
             "", "| method | status | test acc | val acc | density | state bytes | constant | steps | train s | device | "
             "forward | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(rs, key=lambda r: (r.get("test_acc") is None, -(r.get("test_acc") or 0)))
    for r in order:
        lines.append(f"| {r['method']} | {r['status']} | {fmt(r.get('test_acc'), '.3f')} | "
                     f"{fmt(r.get('val_acc'), '.3f')} | {fmt(r.get('density'), '.3f')} | {fmt(r.get('state_bytes'), '.3g')} | "
                     f"{'' if r.get('state_constant') is None else ('yes' if r['state_constant'] else 'no')} | "
                     f"{fmt(r.get('steps'), 'd')} | {fmt(r.get('wall_s'), '.0f')} | {r.get('device', '')} | "
                     f"{r.get('forward', '')} | "
                     f"{r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def plot(rs: list[dict], path: Path, setting: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in rs if r.get("test_acc") is not None and r.get("state_bytes")]
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in pts:
        ax.scatter(r["state_bytes"], r["test_acc"], marker="o" if r.get("state_constant") else "s")
        ax.annotate(r["method"], (r["state_bytes"], r["test_acc"]), fontsize=7, xytext=(3, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("recurrent state per sequence (bytes; squares: grows with length)")
    ax.set_ylabel("MQAR test recall accuracy")
    ax.set_title(f"MQAR recall vs state size ({setting})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setting_of(recs: dict) -> str:
    """The setting every record shares (ValueError naming the methods of another one), and the
    device where there is one for all."""
    keys = {}
    for m, r in recs.items():
        keys.setdefault(setting_key(r), []).append(m)
    if len(keys) > 1:
        raise ValueError("MQAR records of different settings (pairs, tokens, vocab, depth, width, steps, target "
                         "density) in one "
                         "table: " + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in keys.items()))
    for r in recs.values():
        pairs, tokens, vocab, depth, dim, steps, target = setting_key(r)
        devices = {device_of(x) for x in recs.values()}
        where = devices.pop() if len(devices) == 1 else "the device in each row"
        budget = "" if target is None else f"every method at the budget for density {target} (its knob fitted); "
        return (f"{pairs} pairs in {tokens} tokens, vocab {vocab}; LM {depth} layers of width {dim}; {budget}"
                f"{steps} steps, {where}")
    return "no records"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", nargs="+", default=["results/mqar/records.jsonl"])
    ap.add_argument("--methods", default="", help="comma-separated: the methods asked for")
    ap.add_argument("--out", default="results/mqar")
    a = ap.parse_args(argv)
    recs = newest(*map(Path, a.store))
    rs = rows(recs, [m for m in a.methods.split(",") if m])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = setting_of(recs)
    (out / "table.md").write_text(table(rs, setting))
    plot(rs, out / "recall_vs_state.png", setting)
    print(f"{out / 'table.md'}, {out / 'recall_vs_state.png'}: {len(rs)} methods, {len(recs)} with a record")


if __name__ == "__main__":
    main()
