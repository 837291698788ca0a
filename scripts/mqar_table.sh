#!/usr/bin/env bash
# MQAR (tasks/mqar.py, Zoology's multi-query associative recall) on one GPU: each method's small
# LM (2 layers of width 128) trained on MQAR, JOBS runs at a time on the one GPU
# (hydra/launcher=gpu_pool with GPU 0 listed JOBS times), then results/mqar/: the records,
# table.md and recall_vs_state.png (test recall accuracy against the attention's recurrent state
# in bytes per sequence).
#   bash scripts/mqar_table.sh [STORE] [extra Hydra overrides...]
#   EXPERIMENT=mqar/small (default: 8 pairs in 128 tokens over 512 symbols; dense reaches 0.99
#     in 1500 steps on the CPU) | mqar/default (Zoology's 16 pairs in 256 tokens over 8192: every
#     method, dense included, stayed at chance after 600 steps on the H200, session 14:
#     results/mqar/gpu_s14_600steps/; it needs tens of thousands of steps)
#   METHODS=a,b,...  (default: every conf/method/*.yaml)   STEPS=... (default 1500)   JOBS=... (default 12)
#   DENSE_FORWARD=skip | train (default: train, as the session-15 table ran them). skip: the KV-cache
#     presses and decode-time selectors (forward = dense attention, methods.dense_forward) record
#     "not run: forward is dense attention" instead of training
#   TARGET_DENSITY=0.25: each method with a budget knob (methods.budget.KNOBS) trains at the budget that
#     keeps that share of the causal pairs at the task's length; those without one record "not run"
#   BUDGET_S=... (default 500: runs still going then are stopped; the table says "not run"; the
#     same command with the same STORE resumes, finished runs skipped)
# Time, from session 14's H200 run at the default size (6 runs at a time beside two quality jobs):
# 600 steps took 60-200 s a run (dense 60 s), 34 of 46 runs in 570 s. At the small size (half the
# tokens a step) and 1500 steps, estimated ~1-3 minutes a run: the whole table is about two
# calls of 500 s at JOBS=8-12 (an estimate, not yet measured).
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
EXPERIMENT=${EXPERIMENT:-mqar/small}
mkdir -p "$(dirname "$STORE")"
source scripts/launch_pool.sh  # LAUNCH: JOBS runs at a time on GPU 0, or on the CPU
# the same step budget for every method: warm-up a tenth of it (mqar/default's 400 of 8000 would
# leave a 600-step run two thirds in warm-up), one evaluation at the end
STEPS=${STEPS:-1500}
BUDGET_ARGS=(runner.steps="$STEPS" runner.warmup_steps=$((STEPS / 10)) runner.eval_every="$STEPS"
             runner.ckpt_every="$STEPS")
[ "${DENSE_FORWARD:-train}" = train ] || BUDGET_ARGS+=(runner.skip_dense_forward=true)
# equal budget: every sparse method at the knob that keeps this share of the causal pairs at the task's
# length (at 128 tokens nearly every sparse method's default budget is the whole sequence: dense)
[ -z "${TARGET_DENSITY:-}" ] || BUDGET_ARGS+=("+runner.target_density=$TARGET_DENSITY")
timeout --signal=INT --kill-after=20 "${BUDGET_S:-500}" \
    $AB -m "${LAUNCH[@]}" experiment="$EXPERIMENT" method="$METHODS" "${BUDGET_ARGS[@]}" \
        store="$STORE" "$@" \
    || echo "mqar: some runs failed or ran out of the budget (the table says which)"
$PY scripts/mqar_report.py --store "$STORE" --methods "$METHODS" --out "$(dirname "$STORE")"
