"""hydra/launcher=gpu_pool: local multiruns with one GPU per job.

Hydra has no built-in way to give each job of a local multirun its own GPU. This launcher
runs as many jobs at a time as there are GPUs, each in a fresh process (spawned, one job
per process, so no CUDA state leaks between jobs) that sees only the GPU it took from a
shared pool (CUDA_VISIBLE_DEVICES is set before anything touches CUDA) and gives back when
it ends, whether the job succeeded or not.

    attnbench -m hydra/launcher=gpu_pool method=dense,performer,nystrom,bigbird
    attnbench -m hydra/launcher=gpu_pool hydra.launcher.gpus=[0,2] ...
"""

import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import open_dict

log = logging.getLogger(__name__)


@dataclass
class GpuPoolLauncherConf:
    _target_: str = "hydra_plugins.attnbench_launcher.gpu_pool.GpuPoolLauncher"
    gpus: Any = "auto"  # auto: every visible GPU; or a list of device ids; or a count


ConfigStore.instance().store(group="hydra/launcher", name="gpu_pool", node=GpuPoolLauncherConf,
                             provider="attnbench")


def visible_gpus(spec) -> list[str]:
    if spec == "auto":
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is not None:
            return [g for g in env.split(",") if g.strip()]
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    if isinstance(spec, int):
        return [str(i) for i in range(spec)]
    return [str(g) for g in spec]


def _execute(payload: bytes, pool) -> bytes:
    gpu = pool.get()
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before the job imports or touches CUDA
    import cloudpickle  # joblib's own dependency (via the joblib launcher)

    try:
        idx, overrides, hydra_context, config, task_function, singleton_state = cloudpickle.loads(payload)
        setup_globals()
        Singleton.set_state(singleton_state)
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)
        ret = run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        return cloudpickle.dumps(ret)  # a JobReturn; a failed job raises when the sweep reads it
    finally:
        pool.put(gpu)


class GpuPoolLauncher(Launcher):
    def __init__(self, gpus: Any = "auto") -> None:
        self.gpus = gpus
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides, initial_job_idx: int):
        import cloudpickle  # joblib's own dependency (via the joblib launcher)

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        gpus = visible_gpus(self.gpus)
        if not gpus:
            raise RuntimeError("hydra/launcher=gpu_pool found no GPU: set hydra.launcher.gpus")
        log.info("gpu_pool: %d job(s) over GPU(s) %s, %d at a time", len(job_overrides),
                 ",".join(gpus), len(gpus))
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            pool = manager.Queue()
            for g in gpus:
                pool.put(g)
            with ProcessPoolExecutor(max_workers=len(gpus), mp_context=ctx, max_tasks_per_child=1) as ex:
                futures = []
                for i, overrides in enumerate(job_overrides):
                    idx = initial_job_idx + i
                    log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                    payload = cloudpickle.dumps((idx, overrides, self.hydra_context, self.config,
                                                 self.task_function, Singleton.get_state()))
                    futures.append(ex.submit(_execute, payload, pool))
                results: list[JobReturn] = [cloudpickle.loads(f.result()) for f in futures]
        return results
