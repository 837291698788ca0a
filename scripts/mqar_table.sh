#!/usr/bin/env bash
# MQAR (tasks/mqar.py, Zoology's multi-query associative recall) on one GPU: each method's small
# LM (conf/experiment/mqar/default.yaml: 16 pairs in 256 tokens, 2 layers of width 128) trained
# on MQAR, JOBS runs at a time on the one GPU (hydra/launcher=gpu_pool with GPU 0 listed JOBS
# times), then results/mqar/: the records, table.md and recall_vs_state.png (test recall
# accuracy against the attention's recurrent state in bytes per sequence).
#   bash scripts/mqar_table.sh [STORE] [extra Hydra overrides...]
#   METHODS=a,b,...  (default: every conf/method/*.yaml)   STEPS=... (default 600; the
#   experiment's own is 8000)   JOBS=... (default 12)
#   BUDGET_S=... (default 500: runs still going then are stopped; the table says "not run")
# The default budget, an estimate not yet measured on the GPU: the first H200 call (8 runs at a
# time, full-vocabulary logits, a host sync every step) made 2000 steps in ~450 s per run, ~35
# steps/s over the GPU; logits at the answers only cut a CPU step 2.5-6x (the vocabulary
# projection was most of it), so >= 70 steps/s is assumed: 45 causal methods x 600 steps
# = 27k steps, ~390 s, leaving ~100 s of the 500 for start-up and Triton compiles. Whether 600
# steps let dense learn 16 pairs in 256 tokens is not yet known (the first call's 0.088 after
# 2000 steps came from the former embedding init, fixed since; at 4 pairs in 32 tokens on the CPU
# dense needs ~400 steps): if not, split the methods over several calls (METHODS=...).
#   LAUNCHER=local on a machine without GPU (the CPU check: JOBS=2 and experiment=mqar/smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-results/mqar/records.jsonl}
shift || true
AB=${ATTNBENCH:-attnbench}
PY=${PYTHON:-python}
ALL=$(ls conf/method/*.yaml | xargs -n1 basename | sed 's/\.yaml$//' | paste -sd, -)
METHODS=${METHODS:-$ALL}
JOBS=${JOBS:-12}
EXPERIMENT=${EXPERIMENT:-mqar/default}
mkdir -p "$(dirname "$STORE")"
if [ "${LAUNCHER:-gpu_pool}" = gpu_pool ]; then
    POOL=$(printf '0%.0s,' $(seq "$JOBS"))  # GPU 0, JOBS times
    POOL="[${POOL%,}]"
    LAUNCH=(hydra/launcher=gpu_pool "hydra.launcher.gpus=$POOL")
else
    LAUNCH=(hydra/launcher=local "hydra.launcher.n_jobs=$JOBS")
fi
# the same step budget for every method: warm-up a tenth of it (the experiment's 400 of 8000 would
# leave a 600-step run two thirds in warm-up), one evaluation at the end
STEPS=${STEPS:-600}
BUDGET_ARGS=(runner.steps="$STEPS" runner.warmup_steps=$((STEPS / 10)) runner.eval_every="$STEPS"
             runner.ckpt_every="$STEPS")
timeout --signal=INT --kill-after=20 "${BUDGET_S:-500}" \
    $AB -m "${LAUNCH[@]}" experiment="$EXPERIMENT" method="$METHODS" "${BUDGET_ARGS[@]}" \
        store="$STORE" "$@" \
    || echo "mqar: some runs failed or ran out of the budget (the table says which)"
$PY scripts/mqar_report.py --store "$STORE" --methods "$METHODS" --out "$(dirname "$STORE")"
