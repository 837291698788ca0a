"""Evidence of a multi-GPU run, from what its jobs wrote (scripts/two_gpu.sh).

- a one-GPU-per-job sweep (hydra/launcher=gpu_pool): per job, its process, the device it was
  given and the physical GPU its record names, its time span, and the jobs it overlapped;
- a DDP training run beside a single-process run with the same global batch: their loss
  curves step by step.

    python -m analysis.multi_gpu sweep SWEEP_DIR STORE
    python -m analysis.multi_gpu ddp SINGLE_STORE DDP_STORE [--tol 0.02]
"""
from __future__ import annotations

import argparse

from analysis.sweep import jobs
from runners.records import read


def overlaps(js: list[dict]) -> dict[str, list[str]]:
    """job -> the jobs whose time span overlapped its own."""
    return {a["job"]: [b["job"] for b in js if b is not a and b["started"] < a["ended"] and a["started"] < b["ended"]]
            for a in js}


def max_concurrency(js: list[dict]) -> int:
    events = sorted([(j["started"], 1) for j in js] + [(j["ended"], -1) for j in js], key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def sweep_report(sweep_dir, store) -> tuple[str, bool]:
    """A markdown table and whether every job ran alone on its own device (no two overlapping
    jobs shared a device; each record saw one GPU)."""
    js = jobs(sweep_dir)
    recs = read(store)
    by_pid: dict[int, list[dict]] = {}
    for r in recs:
        by_pid.setdefault(r["env"].get("pid"), []).append(r)
    ov = overlaps(js)
    t0 = min((j["started"] for j in js), default=0.0)
    lines = ["| job | pid | CUDA_VISIBLE_DEVICES | GPU uuid (records) | GPUs seen | records | start s | end s | overlapped |",
             "|---|---|---|---|---|---|---|---|---|"]
    alone = bool(js)
    for j in js:
        rs = by_pid.get(j["pid"], [])
        uuids = sorted({str(r["env"].get("gpu_uuid")) for r in rs})
        seen = sorted({r["env"].get("gpus_visible") for r in rs}, key=str)
        mine = {j["cuda_visible_devices"]}
        shared = [o for o in ov[j["job"]] if next(x for x in js if x["job"] == o)["cuda_visible_devices"] in mine]
        alone &= not shared and seen == [1] and len(uuids) == 1
        lines.append(f"| {j['job']} | {j['pid']} | {j['cuda_visible_devices']} | {', '.join(u[:13] for u in uuids)} | "
                     f"{', '.join(map(str, seen))} | {len(rs)} {'/'.join(sorted({r['status'] for r in rs}))} | "
                     f"{j['started'] - t0:.1f} | {j['ended'] - t0:.1f} | {', '.join(ov[j['job']]) or '-'} |")
    n_uuid = len({str(r["env"].get("gpu_uuid")) for r in recs})
    lines += ["", f"{len(js)} jobs, {len(recs)} records, {n_uuid} distinct GPUs; at most "
              f"{max_concurrency(js)} jobs ran at a time; every job alone on its own GPU: {alone}"]
    return "\n".join(lines), alone


def ddp_report(single_store, ddp_store, tol: float = 0.02) -> tuple[str, bool]:
    """The newest ok training record of each store; loss curves compared point by point."""
    def last_ok(store):
        ok = [r for r in read(store) if r["status"] == "ok" and r["runner"] == "train"]
        if not ok:
            raise SystemExit(f"{store}: no ok training record")
        return ok[-1]

    one, two = last_ok(single_store), last_ok(ddp_store)
    a, b = one["train"]["loss_curve"], two["train"]["loss_curve"]
    if len(a) != len(b):
        raise SystemExit(f"loss curves of different lengths: {len(a)} vs {len(b)}")
    rel = [abs(x - y) / max(abs(x), 1e-8) for x, y in zip(a, b)]
    ok = max(rel) <= tol and one["train"]["tokens"] == two["train"]["tokens"]
    rows = [("processes", 1, two["details"].get("world_size")),
            ("GPUs (records)", one["env"].get("gpu"), two["env"].get("gpu")),
            ("global batch", one["batch_size"], two["batch_size"]),
            ("steps", one["train"]["steps"], two["train"]["steps"]),
            ("tokens", one["train"]["tokens"], two["train"]["tokens"]),
            ("first loss", f"{a[0]:.4f}", f"{b[0]:.4f}"),
            ("final loss", f"{a[-1]:.4f}", f"{b[-1]:.4f}"),
            *((k, f"{one['metrics'][k]:.4f}", f"{two['metrics'][k]:.4f}")
              for k in ("test_ppl", "test_acc") if k in one["metrics"] and k in two["metrics"]),
            ("train wall s", f"{one['train']['wall_s']:.1f}", f"{two['train']['wall_s']:.1f}")]
    lines = ["| | one process | DDP |", "|---|---|---|", *(f"| {k} | {x} | {y} |" for k, x, y in rows), "",
             f"loss curve: {len(a)} points, largest relative difference {max(rel):.2e} "
             f"(mean {sum(rel) / len(rel):.2e}); within {tol:g}: {ok}"]
    return "\n".join(lines), ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("sweep_dir")
    s.add_argument("store")
    d = sub.add_parser("ddp")
    d.add_argument("single_store")
    d.add_argument("ddp_store")
    d.add_argument("--tol", type=float, default=0.02)
    a = ap.parse_args(argv)
    text, ok = sweep_report(a.sweep_dir, a.store) if a.what == "sweep" else ddp_report(a.single_store, a.ddp_store, a.tol)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
