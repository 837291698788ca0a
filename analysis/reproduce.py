"""Published numbers beside ours: ``python -m analysis.reproduce [--data analysis/published.yaml]``.

For each entry of the data file, our value is looked up in the committed records (the
newest ok record matching its selector); speedups are against SDPA's default backend in the
same store, setting and length. Prints source, theirs, ours, the difference and whether it
is within the stated tolerance; an entry with no matching record says "not run".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from analysis.records import load

ROOT = Path(__file__).resolve().parent.parent


def _select(df: pd.DataFrame, sel: dict) -> pd.DataFrame:
    df = df[(df["method"] == sel["method"]) & (df["status"] == "ok")]
    for key in ("task", "seq_len", "causal"):
        if key in sel:
            df = df[df[key] == sel[key]]
    for k, v in (sel.get("params") or {}).items():
        if df.empty:
            break
        df = df[df["method_params"].apply(lambda p, k=k, v=v: isinstance(p, dict) and p.get(k) == v)]
    return df.sort_values("time")


def _peers_speedup(sel: dict, root: Path) -> float | None:
    """baseline p50 / kernel p50 from scripts/peers.py's records (newest of each)."""
    from analysis.records import newest_peers

    path = root / sel["peers"]
    if not path.exists():
        return None
    p50 = {name: r["latency_ms"]["p50"] for (_, name, T), r in newest_peers(path).items()
           if T == sel["seq_len"] and not r.get("error")}
    if sel["kernel"] not in p50 or sel["baseline"] not in p50:
        return None
    return p50[sel["baseline"]] / p50[sel["kernel"]]


class MixedSettings(ValueError):
    """The records an entry selects differ in a setting that changes the result."""


def ours(entry: dict, root: Path = ROOT) -> float | None:
    sel = entry["ours"]
    if "peers" in sel:
        return _peers_speedup(sel, root)
    store = root / sel["store"]
    if not store.exists():
        return None
    df = load(store)
    rows = _select(df, sel)
    if rows.empty:
        return None
    if rows["config_key"].nunique() > 1:  # the newest would be any of them: say so, show none
        from analysis.records import setting_labels

        raise MixedSettings("records of several settings match: " + "; ".join(
            sorted(set(setting_labels(rows))))[:200])
    row = rows.iloc[-1]
    if sel.get("speedup"):
        base = _select(df, {"method": "dense", "seq_len": row["seq_len"], "causal": row["causal"]})
        base = base[base["config_key"] == row["config_key"]]  # the baseline of the same setting
        base = base[base["method_params"].apply(lambda p: p.get("backend", "auto") == "auto")]
        if base.empty:
            return None
        return float(base.iloc[-1]["latency.forward.p50"] / row["latency.forward.p50"])
    per_seed = rows.groupby("seed", dropna=False, sort=True).tail(1)  # several seeds: their mean
    return float(per_seed[f"metric.{sel['metric']}"].astype(float).mean()) * float(sel.get("scale", 1))


def table(entries: list[dict], root: Path = ROOT) -> pd.DataFrame:
    rows = []
    for e in entries:
        try:
            v, why = ours(e, root), "not run"
        except MixedSettings as exc:
            v, why = None, f"refused: {exc}"
        diff = None if v is None else v - e["value"]
        rows.append({"id": e["id"], "metric": e["metric"], "theirs": e["value"],
                     "ours": why if v is None else f"{v:.2f}",
                     "difference": "-" if diff is None else f"{diff:+.2f}",
                     "tolerance": e["tolerance"],
                     "within": "-" if diff is None else ("yes" if abs(diff) <= e["tolerance"] else "no"),
                     "source": e["source"]})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT / "analysis/published.yaml"))
    args = ap.parse_args(argv)
    entries = yaml.safe_load(Path(args.data).read_text())
    t = table(entries)
    print(t.to_markdown(index=False, disable_numparse=True))
    done = t[t["within"] != "-"]
    print(f"\n{(done['within'] == 'yes').sum()} of {len(done)} compared within tolerance; "
          f"{(t['within'] == '-').sum()} not run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
