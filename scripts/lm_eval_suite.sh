#!/usr/bin/env bash
# The LM figures: train the small LM (dense) on the corpus at 4k tokens, with needle episodes
# mixed into its training windows (task.needle_episodes: retrieval practice, so that the
# evaluations measure the attention methods, not an LM that never learned to look back), then
# evaluate each training-free method swapped into it on the needle grid and the RULER-like
# suite, all evaluations at once (GPU).
#   bash scripts/lm_eval_suite.sh [STORE] [extra training overrides...]
#   CKDIR=... (checkpoints; default results/lm/checkpoints)  STEPS=... (default 3000)
# -> needle heatmaps in results/figures/needle-*.png, the RULER table in results/lm/ruler.md
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-results/lm/records.jsonl}
shift || true
AB=${ATTNBENCH:-attnbench}
PY=${PYTHON:-python}
CKDIR=${CKDIR:-results/lm/checkpoints}
LOGS=${LOGS:-$(dirname "$STORE")/logs}
mkdir -p "$LOGS"
$AB experiment=lm/shakespeare method=dense task.max_len=4096 task.needle_episodes=8000 \
    runner.steps="${STEPS:-3000}" store="$STORE" runner.checkpoint_dir="$CKDIR" "$@"
CKPT=$($PY - "$STORE" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"perplexity"' in l]
print([r for r in recs if r["status"] == "ok"][-1]["details"]["checkpoint"])
PY
)
METHODS=("method=dense" "method=sliding_window method.impl=triton"
         "method=minference method.pattern=a_shape method.impl=triton"
         "method=minference method.pattern=vertical_slash method.impl=triton"
         "method=minference method.pattern=block_sparse method.impl=triton")
for task in needle ruler; do
    for m in "${METHODS[@]}"; do
        # shellcheck disable=SC2086
        $AB runner=evaluate task=$task model=lm runner.checkpoint="$CKPT" store="$STORE" $m \
            > "$LOGS/$task-${m//[ =.]/_}.log" 2>&1 || echo "$task $m failed (its record and log say why)" &
    done
done
wait
$PY -m analysis.figures needle --store "$STORE" --out results/figures
$PY -m analysis.figures ruler --store "$STORE" --out results/lm/ruler.md
