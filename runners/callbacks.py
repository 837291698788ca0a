"""The job file: what one job of a sweep did, for the end-of-sweep summary.

Each job writes ``attnbench_job.json`` (its records' statuses, or that it was skipped) into
its own output folder; ``analysis.sweep.SweepSummary`` (the Hydra callback) adds them up at
the end of a multirun.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

JOB_FILE = "attnbench_job.json"


def write_job_summary(output_dir, recs, started: float, error: str | None = None) -> None:
    """``error``: the job crashed before it wrote a record (it failed, it was not skipped)."""
    statuses = [r.status for r in recs]
    Path(output_dir, JOB_FILE).write_text(json.dumps({
        "statuses": statuses, "skipped": not statuses and error is None, "crashed": error is not None,
        "errors": [r.error for r in recs if r.error] + ([error] if error else []), "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "started": started, "ended": time.time()}))
