"""Hydra callbacks: the end-of-sweep summary.

Each job writes ``attnbench_job.json`` (its records' statuses, or that it was skipped) into
its own output folder; at the end of a multirun the summary adds them up (whatever the
launcher: the files are on the shared file system), prints done / skipped / failed, and
rebuilds the leaderboard of the store next to it.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("attnbench")
JOB_FILE = "attnbench_job.json"


def write_job_summary(output_dir, recs, started: float) -> None:
    import os
    import time

    statuses = [r.status for r in recs]
    Path(output_dir, JOB_FILE).write_text(json.dumps({
        "statuses": statuses, "skipped": not statuses,
        "errors": [r.error for r in recs if r.error], "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "started": started, "ended": time.time()}))


def summarize(sweep_dir) -> dict:
    jobs = [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).glob(f"*/{JOB_FILE}"))]
    c = Counter(s for j in jobs for s in j["statuses"])
    failed = sum(n for s, n in c.items() if s != "ok")
    return {"jobs": len(jobs), "records_ok": c.get("ok", 0), "records_failed": failed,
            "by_status": dict(c), "jobs_skipped": sum(j["skipped"] for j in jobs),
            "errors": [e for j in jobs for e in j["errors"]]}


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        s = summarize(config.hydra.sweep.dir)
        status = ", ".join(f"{n} {k}" for k, n in sorted(s["by_status"].items())) or "no records"
        log.info("sweep summary: %d jobs; records: %s; %d job(s) skipped (already done)",
                 s["jobs"], status, s["jobs_skipped"])
        for e in s["errors"][:10]:
            log.info("  failed: %s", e[:300])
        store = Path(config.store)
        if store.exists():
            from analysis.leaderboard import load, render

            out = store.with_name("leaderboard.md")
            out.write_text(render(load(store)))
            log.info("leaderboard rebuilt: %s", out)
        Path(config.hydra.sweep.dir, "summary.json").write_text(json.dumps(s, indent=1))
