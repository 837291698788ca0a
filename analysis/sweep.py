"""The end of a multirun: what its jobs did, and the leaderboard of the store rebuilt.

Each job writes ``attnbench_job.json`` into its own output folder (``runners.callbacks``);
at the end of a multirun ``SweepSummary`` (a Hydra callback, named in ``conf/config.yaml``)
adds them up (whatever the launcher: the files are on the shared file system), prints done /
skipped / failed, writes ``summary.json`` into the sweep folder and rebuilds
``leaderboard.md`` next to the store.
"""
from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from analysis.records import load
from analysis.render import render
from runners.callbacks import JOB_FILE

log = logging.getLogger("attnbench")


def jobs(sweep_dir) -> list[dict]:
    """Each job's summary file (statuses, pid, CUDA_VISIBLE_DEVICES, started/ended), in job order."""
    out = []
    for p in sorted(Path(sweep_dir).glob(f"*/{JOB_FILE}"), key=lambda p: int(p.parent.name)
                    if p.parent.name.isdigit() else p.parent.name):
        out.append({"job": p.parent.name, **json.loads(p.read_text())})
    return out


def summarize(sweep_dir) -> dict:
    """Jobs, records by status, skipped jobs and error messages of one sweep; a job failed when
    one of its records did not succeed, or when it left no job file (it crashed)."""
    js = jobs(sweep_dir)
    c = Counter(s for j in js for s in j["statuses"])
    failed = sum(n for s, n in c.items() if s != "ok")
    written = {j["job"] for j in js}
    crashed = sorted(p.name for p in Path(sweep_dir).iterdir()
                     if p.is_dir() and p.name.isdigit() and p.name not in written) if Path(sweep_dir).is_dir() else []
    return {"jobs": len(js) + len(crashed), "records_ok": c.get("ok", 0), "records_failed": failed,
            "by_status": dict(c), "jobs_skipped": sum(j["skipped"] for j in js),
            "jobs_failed": sum(j.get("crashed", False) or any(s != "ok" for s in j["statuses"]) for j in js)
            + len(crashed),
            "jobs_crashed": crashed + [j["job"] for j in js if j.get("crashed")], "errors": [e for j in js for e in j["errors"]]}


LOCK = ".sweep.lock"


def hold_sweep_dir(sweep_dir):
    """An exclusive lock on the sweep folder for this process's life (its open file), or exit
    with a message naming the sweep that holds it: two sweeps never share one output folder.
    A killed sweep's lock ends with it."""
    import fcntl
    import os

    folder = Path(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 100).decode(errors="replace").strip() or "?"
        os.close(fd)
        log.error("hydra.sweep.dir %s is in use by another sweep (pid %s): give this one another "
                  "hydra.sweep.dir", folder, holder)
        sys.exit(1)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._lock = hold_sweep_dir(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        s = summarize(config.hydra.sweep.dir)
        status = ", ".join(f"{n} {k}" for k, n in sorted(s["by_status"].items())) or "no records"
        log.info("sweep summary: %d jobs; records: %s; %d job(s) skipped (already done)",
                 s["jobs"], status, s["jobs_skipped"])
        for e in s["errors"][:10]:
            log.info("  failed: %s", e[:300])
        store = Path(config.store)
        if store.exists():
            out = store.with_name("leaderboard.md")
            try:
                out.write_text(render(load(store)))
                log.info("leaderboard rebuilt: %s", out)
            except Exception as exc:  # noqa: BLE001 - the summary and the exit status still count
                log.error("could not rebuild the leaderboard %s: %s: %s", out, type(exc).__name__, exc)
        Path(config.hydra.sweep.dir, "summary.json").write_text(json.dumps(s, indent=1))
        if s["jobs_failed"]:
            log.error("sweep: %d of %d job(s) failed%s", s["jobs_failed"], s["jobs"],
                      f" ({len(s['jobs_crashed'])} left no job file: crashed)" if s["jobs_crashed"] else "")
            sys.exit(1)  # a sweep with failed jobs is not a success
