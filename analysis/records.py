"""Load run records into a flat pandas DataFrame (one row per record)."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from runners import records as store

COLUMNS = ["run_id", "time", "method", "impl", "real_kernel", "model", "task", "runner",
           "seq_len", "batch_size", "dtype", "device", "causal", "status", "error", "seed"]


DERIVED = ["gpu", "backend", "timed", "shape", "method_params", "config_key", "decode_path", "decode_fallback"]
# config keys that do not change a result, or that rows already show: where it is stored, the
# method (the row's label), the seed (averaged), the lengths (one record each), the passes timed
# (the ``timed`` column), whether it was forced or resumed, whether dense-forward methods were
# skipped, the CPU threads a run used; device and dtype are taken resolved
NOT_SETTING = ("store", "seed", "impl", "method", "hydra", "logger", "device", "dtype", "runner.force",
               "runner.seq_lens", "runner.backward", "runner.checkpoint_dir", "runner.resume",
               "runner.skip_dense_forward", "runner.cpu_threads",
               "task.batch_size")  # task.batch_size: prompts scored per forward (needle, lm_harness): memory, not results
FIRST = ("runner.steps", "runner.batch_size", "model.batch_size")  # named first in a setting label
PASSES = ("forward", "backward")


def timed_passes(rec: dict) -> str:
    """The passes a run timed, from its latency keys: ``forward``, ``backward`` or
    ``forward+backward`` (each timed on its own). A run with no timings (failed, OOM) names the
    passes it was to time: its forward, and its backward where ``runner.backward`` was true."""
    lat = rec.get("latency_ms") or {}
    if not lat:
        backward = ((rec.get("config") or {}).get("runner") or {}).get("backward") is True
        lat = ("forward", "backward") if backward else ("forward",)
    return "+".join(p for p in PASSES if p in lat)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in NOT_SETTING:
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_key(rec: dict) -> str:
    """Everything of a record's setting that changes its result but is not its method, seed or
    length: the config (less ``NOT_SETTING``) and the resolved device, GPU model and dtype, as
    one JSON string. Two records are of the same experiment when their keys are equal."""
    env = rec.get("env") or {}
    flat = _flatten(rec.get("config") or {})
    flat.update({"device": str(rec.get("device") or "").split(":")[0] or None, "gpu": env.get("gpu"),
                 "dtype": rec.get("dtype")})
    return json.dumps(flat, sort_keys=True, default=str)


def setting_labels(df: pd.DataFrame, shown: int = 3) -> pd.Series:
    """A label per row naming the settings (``config_key``) that differ between the rows of
    ``df``: "" where all rows are of one setting, else e.g. ``runner.steps=20 runner.batch_size=16
    model.dim=32 +9 more #3fa2`` (the hash tells apart labels cut short)."""
    if "config_key" not in df or not len(df):
        return pd.Series("", index=df.index, dtype=object)
    keys = df["config_key"].fillna("{}")
    if keys.nunique() <= 1:
        return pd.Series("", index=df.index, dtype=object)
    cfgs = {k: json.loads(k) for k in keys.unique()}
    names = sorted({n for c in cfgs.values() for n in c})
    varying = [n for n in names if len({json.dumps(c.get(n), sort_keys=True, default=str)
                                        for c in cfgs.values()}) > 1]
    varying.sort(key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n))
    labels = {}
    for k, c in cfgs.items():
        parts = [f"{n}={c.get(n)}" for n in varying]
        text = " ".join(parts[:shown])
        if len(parts) > shown:
            text += f" +{len(parts) - shown} more #{hashlib.sha1(k.encode()).hexdigest()[:4]}"
        labels[k] = text
    return keys.map(labels)


def _flat(rec: dict) -> dict:
    row = {c: rec.get(c) for c in COLUMNS}
    row["config_key"] = config_key(rec)
    row["gpu"] = (rec.get("env") or {}).get("gpu")
    row["backend"] = (rec.get("details") or {}).get("backend")
    row["decode_path"] = (rec.get("details") or {}).get("decode_path")  # runner=decode: the path, and
    row["decode_fallback"] = (rec.get("details") or {}).get("decode_fallback")  # "dense" where it has none
    row["timed"] = timed_passes(rec)
    m = (rec.get("config") or {}).get("model") or {}
    row["shape"] = (f"H={m['num_heads']} Hkv={m.get('num_kv_heads') or m['num_heads']} D={m['head_dim']}"
                    if "num_heads" in m and "head_dim" in m else None)  # attention shape of the run
    for k, v in (rec.get("metrics") or {}).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            row[f"metric.{k}"] = v
    for phase, q in (rec.get("latency_ms") or {}).items():
        for k, v in q.items():
            row[f"latency.{phase}.{k}"] = v
    for phase, v in (rec.get("peak_mem_bytes") or {}).items():
        row[f"mem.{phase}"] = v
    for k, v in (rec.get("cost") or {}).items():
        row[f"cost.{k}"] = v
    corr = rec.get("correctness") or {}
    row["correctness.passed"] = corr.get("passed")
    row["correctness.max_rel_err"] = corr.get("max_rel_err")
    for k, v in (rec.get("train") or {}).items():
        row[f"train.{k}"] = v
    row["method_params"] = rec.get("method_params")
    return row


def failure(status: str, error) -> str:
    """How a table shows a run that did not succeed: its status and the reason (an OOM is its
    own reason), on one line and without the characters that break a markdown table."""
    if status == "ok":
        return "ok"
    err = "" if error is None or (isinstance(error, float) and pd.isna(error)) else str(error)
    err = " ".join(err.replace("|", "/").split())
    if not err or status == "oom":
        return str(status)
    if status == "skipped" and err.startswith("not run"):  # e.g. "not run: data absent (...)"
        return err.split(" (", 1)[0]
    return f"{status}: {err[:60]}{'...' if len(err) > 60 else ''}"


def load(*stores, latest: bool = True) -> pd.DataFrame:
    """All records of the given JSONL stores; with ``latest``, one row per run_id (the
    newest record: a forced re-run replaces the old result)."""
    rows = [_flat(r) for s in stores for r in store.read(s)]
    df = pd.DataFrame(rows, columns=None if rows else COLUMNS)
    for c in DERIVED:  # an empty store still has every column the tables look up
        if c not in df:
            df[c] = None
    if latest and len(df):
        df = df.sort_values("time", kind="stable").drop_duplicates("run_id", keep="last")
    return df.reset_index(drop=True)


@functools.cache
def config_defaults(method) -> dict:
    """The hyperparameters of ``conf/method/<method>.yaml`` ({} where there is none)."""
    path = Path(__file__).resolve().parents[1] / "conf" / "method" / f"{method}.yaml"
    if not path.is_file():
        return {}
    data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    return {k: v for k, v in data.items() if not str(k).startswith("_")}


def variants(df: pd.DataFrame) -> pd.Series:
    """A label per row: the method, plus its hyperparameters that differ between the rows
    of that method (e.g. ``dense backend=flash``, ``minference pattern=a_shape``). What a run
    timed is not part of it: that is the ``timed`` column."""
    import json

    params = df["method_params"].apply(lambda p: p if isinstance(p, dict) else {})
    # a key a record lacks (it predates that config key) ran at the key's default
    params = pd.Series([{**config_defaults(m), **p} for m, p in zip(df["method"], params)], index=df.index)
    labels = df["method"].astype(str).copy()
    for method, idx in df.groupby("method").groups.items():
        ps = params.loc[idx]
        keys = sorted({k for p in ps for k in p})
        varying = [k for k in keys if k != "impl" and
                   len({json.dumps(p.get(k), sort_keys=True, default=str) for p in ps}) > 1]
        for i in idx:
            extra = " ".join(f"{k}={params.loc[i].get(k)}" for k in varying)
            labels.loc[i] = f"{method} {extra}".strip()
    return labels


def with_setting(labels: pd.Series, settings: pd.Series) -> pd.Series:
    """``label [setting]``, or the label alone where the setting is ""."""
    return pd.Series([f"{lb} [{st}]" if st else lb for lb, st in zip(labels, settings)], index=labels.index)


def labelled(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with a ``label`` column (``variants``, and the setting where the rows
    are of several: ``setting_labels``), one record per (label, impl, timed passes, length, seed): a later run that measured the same thing under another run_id
    (another list of lengths, a later commit) replaces the earlier one, so that only seeds are
    averaged; a run that also timed its backward is a row of its own, not a seed."""
    df = df.copy()
    df["label"] = with_setting(variants(df), setting_labels(df))
    if "timed" not in df:
        df["timed"] = PASSES[0]
    if len(df):
        seed = df["seed"].astype(str) if "seed" in df else ""
        key = (df["label"].astype(str) + "|" + df["impl"].astype(str) + "|" + df["timed"].astype(str)
               + "|" + df["seq_len"].astype(str) + "|" + seed)
        df = df.assign(_key=key).sort_values("time", kind="stable").drop_duplicates("_key", keep="last")
        df = df.drop(columns="_key").sort_index()
    return df


def newest_peers(path) -> dict[tuple, dict]:
    """scripts/peers.py's records (JSON lines, not run records), the newest per (suite, kernel
    name, length)."""
    import json
    from pathlib import Path

    rows = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return {(r.get("suite"), r["name"], r["seq_len"]): r for r in rows}
