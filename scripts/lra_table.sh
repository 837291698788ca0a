#!/usr/bin/env bash
# The LRA table: every method on the LRA tasks at their LRA configurations (a GPU run: hours
# per task and method), then the table (results/lra/leaderboard.md).
#   bash scripts/lra_table.sh [STORE] [extra Hydra overrides...]
# ListOps, Pathfinder and Path-X are generated locally; Image is Fashion-MNIST (fetched here from
# its Debian package; LRA's original is CIFAR-10); Text and Retrieval need their data (README,
# "Long Range Arena"): pass ++task.data_files... or run where the hub is reachable; without it
# their records say "not run: data absent".
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-results/lra/records.jsonl}
shift || true
AB=${ATTNBENCH:-attnbench}
METHODS=${METHODS:-dense,performer,linformer,nystrom,bigbird}
for task in ${TASKS:-listops pathfinder text retrieval image}; do
    if [ "$task" = image ]; then  # Fashion-MNIST (LRA's CIFAR-10 is not reachable): once, on demand
        ${PYTHON:-python} scripts/fetch_assets.py --only fashion_mnist \
            || echo "lra/image: Fashion-MNIST could not be fetched (its runs say: not run, data absent)"
    fi
    $AB -m hydra/launcher=gpu_pool experiment=lra/$task method=$METHODS store="$STORE" "$@" \
        || echo "lra/$task: some runs failed (their records say why)"
done
${PYTHON:-python} -m analysis.leaderboard --store "$STORE" --out "$(dirname "$STORE")/leaderboard.md"
