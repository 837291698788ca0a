# Sourced by the table scripts (mqar_table.sh, lra_table.sh): sets LAUNCH, the Hydra launcher
# arguments for JOBS runs at a time.
#   LAUNCHER=gpu_pool (default): hydra/launcher=gpu_pool with GPU 0 listed JOBS times, JOBS runs
#     sharing the one GPU
#   LAUNCHER=local: JOBS processes on the CPU, each with cores / JOBS torch threads (the runner's
#     default of 2 threads each with JOBS=2 on 2 cores ran 4 spinning threads: several times
#     slower, session 16)
if [ "${LAUNCHER:-gpu_pool}" = gpu_pool ]; then
    POOL=$(printf '0%.0s,' $(seq "$JOBS"))  # GPU 0, JOBS times
    LAUNCH=(hydra/launcher=gpu_pool "hydra.launcher.gpus=[${POOL%,}]")
else
    LAUNCH=(hydra/launcher=local "hydra.launcher.n_jobs=$JOBS" "runner.cpu_threads=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))")
fi
