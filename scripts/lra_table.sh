#!/usr/bin/env bash
# The LRA table: every method by task, SEEDS seeds each (model initialisation; the data is the
# task's own seed), the same step budget for every method of a task, then the table
# (results/lra/leaderboard.md: analysis.tables.lra_table, mean and spread over the seeds).
#   bash scripts/lra_table.sh [STORE] [extra Hydra overrides...]
# Environment:
#   MODE=budget (default) | full. full: each task at its LRA configuration (conf/experiment/lra/:
#     8000-62400 steps; dense ListOps alone took 131 s of an H200, the whole table of ~50 methods
#     x 3 seeds x 3 runnable tasks is days of one GPU). budget: the same model and
#     hyperparameters, fewer steps (ListOps 2000, Pathfinder 500, Image 600; STEPS=n sets all)
#     on smaller generated training sets (ListOps 8000 sequences, Pathfinder 6000 images; 1000
#     validation and test each), evaluated once at the end: every record carries these settings, so the table states them.
#   METHODS=a,b,... (default: every conf/method/*.yaml; a method that cannot run an encoder,
#     e.g. causal only or decode only, leaves a failed record saying why)
#   DENSE_FORWARD=skip (default) | train. skip: the KV-cache presses and decode-time selectors, whose
#     forward pass is dense attention (methods.dense_forward), record "not run: forward is dense
#     attention" instead of training dense attention again (a third of the methods)
#   TASKS="listops pathfinder image text retrieval"  SEEDS=0,1,2  JOBS=12 (runs at a time on
#     the one GPU: gpu_pool with GPU 0 listed JOBS times)  BUDGET_S=240 (per task: runs still
#     going then are stopped; a second call with the same STORE skips the runs already done;
#     the sweep runs every method's seed 0 first, so a cut leaves each method at least one seed)
#   LAUNCHER=local for the CPU check (with EXPERIMENT_SUFFIX=-smoke: the tasks' smoke sizes)
# Pathfinder is generated locally; Image is Fashion-MNIST (fetched here from its Debian package;
# LRA's original is CIFAR-10); Text and Retrieval need their data (README, "Long Range Arena"):
# pass ++task.data_files... or their records say "not run: data absent".
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # Text / Retrieval: fail fast where the hub is out of reach (0: try it)
STORE=${1:-results/lra/records.jsonl}
shift || true
AB=${ATTNBENCH:-attnbench}
PY=${PYTHON:-python}
ALL=$(ls conf/method/*.yaml | xargs -n1 basename | sed 's/\.yaml$//' | paste -sd, -)
METHODS=${METHODS:-$ALL}
JOBS=${JOBS:-12}
SEEDS=${SEEDS:-0,1,2}
SFX=${EXPERIMENT_SUFFIX:-}
mkdir -p "$(dirname "$STORE")"
source scripts/launch_pool.sh  # LAUNCH: JOBS runs at a time on GPU 0, or on the CPU
budget_args() {  # the budget mode's overrides for task $1
    [ "${MODE:-budget}" = budget ] || return 0
    local s
    # steps per task (the same for every method and seed of a task): STEPS overrides. ListOps 2000:
    # dense's loss leaves the label prior at about step 1900 of the LRA schedule (results/lra/README.md);
    # Pathfinder and Image: about the same tokens as ListOps' 2000 steps (their curves are not known yet;
    # session 15's 100 and 150 steps left every method at chance)
    case $1 in
        pathfinder) s=${STEPS:-500} ;;  # 256 x 1024 tokens a step
        image) s=${STEPS:-600} ;;       # 256 x 784
        *) s=${STEPS:-2000} ;;          # ListOps: 32 x 2000
    esac
    echo "runner.steps=$s runner.eval_every=$s runner.ckpt_every=$s runner.warmup_steps=$((s / 10))"
    case $1 in
        listops) echo "task.num_train=8000 task.num_val=1000 task.num_test=1000" ;;
        pathfinder) echo "task.num_train=6000 task.num_val=1000 task.num_test=1000" ;;
    esac
}
for task in ${TASKS:-listops pathfinder image text retrieval}; do
    if [ "$task" = image ]; then  # Fashion-MNIST (LRA's CIFAR-10 is not reachable): once, on demand
        $PY scripts/fetch_assets.py --only fashion_mnist \
            || echo "lra/image: Fashion-MNIST could not be fetched (its runs say: not run, data absent)"
    fi
    # shellcheck disable=SC2207
    EXTRA=($(budget_args "$task"))
    [ "${DENSE_FORWARD:-skip}" = train ] || EXTRA+=(runner.skip_dense_forward=true)
    echo "- $task: MODE=${MODE:-budget} seeds $SEEDS ${EXTRA[*]:-(the LRA configuration)}" >> "$(dirname "$STORE")/budget.md"
    # one run alone first: it builds the task's data cache that the parallel runs then read (a method
    # that trains: a skipped dense-forward one would stop before building it)
    first=$($PY -c "import sys, methods; from methods.dense_forward import dense_forward as d
ms = sys.argv[1].split(',')
print(next((m for m in ms if not d(str(methods.compose_method(m)['_target_']))), ms[0]))" "$METHODS")
    $AB experiment=lra/$task$SFX method="$first" seed="${SEEDS%%,*}" store="$STORE" "${EXTRA[@]}" "$@" \
        || echo "lra/$task: $first failed (its record says why)"
    timeout --signal=INT --kill-after=20 "${BUDGET_S:-240}" \
        $AB -m "${LAUNCH[@]}" experiment=lra/$task$SFX seed="$SEEDS" method="$METHODS" \
            store="$STORE" "${EXTRA[@]}" "$@" \
        || echo "lra/$task: some runs failed or ran out of the budget (their records, or none, say so)"
done
$PY -m analysis.leaderboard --store "$STORE" --out "$(dirname "$STORE")/leaderboard.md"
# the budget each task ran under (appended per call: budget.md), the runs without a record (stopped by BUDGET_S, or never reached): not_run.md
$PY - "$STORE" "$METHODS" "${TASKS:-listops pathfinder image text retrieval}" "$SEEDS" <<'PY'
import json, sys
from pathlib import Path
store, methods, tasks, seeds = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(), sys.argv[4].split(",")
done = set()
for line in store.read_text().splitlines() if store.exists() else []:
    if line.strip():
        r = json.loads(line)
        done.add((r["method"], str(r["task"]).split("/")[-1].removeprefix("lra_"), str(r.get("seed"))))
miss = [(m, t, s) for t in tasks for m in methods for s in seeds if (m, t, s) not in done]
out = store.parent / "not_run.md"
out.write_text("# LRA runs asked for without a record (out of the time budget or not reached)\n\n"
               + "".join(f"- {t} {m} seed {s}\n" for m, t, s in miss))
print(f"{out}: {len(miss)} run(s) without a record")
PY
