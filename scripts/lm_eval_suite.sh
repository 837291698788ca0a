#!/usr/bin/env bash
# The LM figures: train the small LM (dense) on the corpus at 4k tokens, with needle episodes
# mixed into its training windows (task.needle_episodes: retrieval practice, so that the
# evaluations measure the attention methods, not an LM that never learned to look back), then
# evaluate each training-free method swapped into it on the needle grid and the RULER-like
# suite, all evaluations at once (GPU). Then each trainable method (TRAINABLE, default
# performer nsa sparsek) is trained with the same recipe and budget and evaluated the same way.
#   bash scripts/lm_eval_suite.sh [STORE] [extra training overrides...]
#   CKDIR=... (checkpoints; default results/local/lm_checkpoints)  STEPS=... (default 5000)
#   EPISODES=... (needle windows, default 6000)  NEEDLES=... (needles per window, default 8)
#   ANSWER_WEIGHT=... (loss weight of the answers' bytes, default 10)
#   EPISODE_MIN_LEN=... (episodes of 256..4096 bytes packed in each window; null: one per window)
#   TRAINABLE="" to skip the trainable methods; EVAL_ARGS="..." extra overrides of the evaluations
#   FIGDIR=..., RULER_OUT=... where the figures and the table go
# -> needle heatmaps (needle-*.png) and the RULER table (ruler.md) next to STORE (default results/lm/);
#    each evaluation's log in LOGS (default results/local/lm_logs, not committed)
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-results/lm/records.jsonl}
shift || true
AB=${ATTNBENCH:-attnbench}
PY=${PYTHON:-python}
CKDIR=${CKDIR:-results/local/lm_checkpoints}
LOGS=${LOGS:-results/local/lm_logs}
mkdir -p "$LOGS"
RECIPE=(experiment=lm/shakespeare task.max_len=4096 task.needle_episodes="${EPISODES:-6000}"
        task.needles_per_episode="${NEEDLES:-8}" task.answer_weight="${ANSWER_WEIGHT:-10}"
        task.episode_min_len="${EPISODE_MIN_LEN:-256}" runner.steps="${STEPS:-5000}"
        store="$STORE" runner.checkpoint_dir="$CKDIR")

checkpoint() {  # the newest ok training record's checkpoint for method $1
    $PY - "$STORE" "$1" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"perplexity"' in l]
ok = [r for r in recs if r["status"] == "ok" and r["method"] == sys.argv[2] and r["runner"] == "train"]
print(ok[-1]["details"]["checkpoint"] if ok else "")
PY
}

evaluate() {  # evaluate the checkpoint $1 with each method setting that follows, both tasks, at once
    local ckpt=$1
    shift
    for task in needle ruler; do
        for m in "$@"; do
            # shellcheck disable=SC2086
            $AB runner=evaluate task=$task model=lm runner.checkpoint="$ckpt" store="$STORE" $m ${EVAL_ARGS:-} \
                > "$LOGS/$task-${m//[ =.]/_}.log" 2>&1 || echo "$task $m failed (its record and log say why)" &
        done
    done
    wait
}

$AB method=dense "${RECIPE[@]}" "$@"
CKPT=$(checkpoint dense)
[ -n "$CKPT" ] || { echo "the dense LM did not train (see $STORE)"; exit 1; }
evaluate "$CKPT" "method=dense" "method=sliding_window method.impl=triton" \
    "method=minference method.pattern=a_shape method.impl=triton" \
    "method=minference method.pattern=vertical_slash method.impl=triton" \
    "method=minference method.pattern=block_sparse method.impl=triton"

for m in ${TRAINABLE-performer nsa sparsek}; do
    $AB method="$m" "${RECIPE[@]}" "$@" || echo "training with $m failed (its record says why)"
    CKPT=$(checkpoint "$m")
    [ -n "$CKPT" ] && evaluate "$CKPT" "method=$m"
done

$PY -m analysis.figures needle --store "$STORE" --out "${FIGDIR:-$(dirname "$STORE")}"
$PY -m analysis.figures ruler --store "$STORE" --out "${RULER_OUT:-$(dirname "$STORE")/ruler.md}"
