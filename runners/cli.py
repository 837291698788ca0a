"""The ``attnbench`` command: a thin Hydra wrapper around ``runners.run(cfg)``.

    attnbench method=nystrom runner.seq_lens=[1024,4096]
    attnbench -m method=dense,performer impl=reference,sdpa
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from methods import CONF_DIR
from runners import run

log = logging.getLogger("attnbench")


SWEEP_PID = "ATTNBENCH_SWEEP_PID"
_WATCHING = False


def watch_parent(interval: float = 0.5) -> bool:
    """In a sweep's worker process (a job not run by the ``attnbench`` process itself): stop this
    process when its parent dies (a SIGKILLed sweep leaves no orphan appending records). A
    record being appended is one write: it lands whole or not at all. True when watching."""
    import os
    import threading
    import time

    global _WATCHING
    sweep = os.environ.get(SWEEP_PID)
    ppid = os.getppid()
    if not sweep or int(sweep) == os.getpid() or ppid <= 1:
        return False
    if _WATCHING:  # a worker that runs several jobs watches once
        return True
    _WATCHING = True

    def watch():
        while os.getppid() == ppid:
            time.sleep(interval)
        log.error("the sweep's process (pid %d) is gone: job process %d stops", ppid, os.getpid())
        logging.shutdown()
        os._exit(3)

    threading.Thread(target=watch, name="attnbench-parent-watch", daemon=True).start()
    return True


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    import time

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from runners.callbacks import write_job_summary

    watch_parent()
    started = time.time()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        recs = run(cfg)
    except Exception as exc:
        if not multirun:
            raise  # Hydra prints it, and the command exits 1
        # one job's crash is counted at the sweep's end (analysis.sweep), the other jobs go on
        log.error("job failed before writing a record: %s: %s", type(exc).__name__, exc)
        write_job_summary(HydraConfig.get().runtime.output_dir, [], started,
                          error=f"{type(exc).__name__}: {exc}")
        return
    for r in recs:
        lat = r.latency_ms.get("forward", {}).get("p50")
        what = f"forward p50 {lat:.3f} ms" if lat is not None else ", ".join(
            f"{k} {v:.4g}" for k, v in r.metrics.items() if isinstance(v, float))
        log.info("%s T=%s %s: %s %s%s", r.method, r.seq_len, r.impl, r.status, what,
                 f" ({r.error})" if r.error else "")
    log.info("%d record(s) appended to %s", len(recs), cfg.store)
    from runners.logger import log_records

    log_records(cfg, recs)
    write_job_summary(HydraConfig.get().runtime.output_dir, recs, started)
    failed = [r for r in recs if r.status != "ok"]
    if failed:
        log.error("%d of %d record(s) failed: %s", len(failed), len(recs),
                  "; ".join(f"{r.method} T={r.seq_len}: {r.status} ({r.error})" for r in failed[:5]))
        if not multirun:  # a sweep's jobs are counted at its end (analysis.sweep)
            sys.exit(1)


def main() -> None:
    """The ``attnbench`` command: the Hydra app, its process named to the jobs it starts (so that
    a worker knows it is one, ``watch_parent``)."""
    import os

    os.environ.setdefault(SWEEP_PID, str(os.getpid()))
    _main()


if __name__ == "__main__":
    main()
