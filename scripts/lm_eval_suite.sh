#!/usr/bin/env bash
# The LM figures: train the small LM (dense) on the corpus at 4k tokens, then evaluate every
# training-free method swapped into it on the needle grid and the RULER-like suite (GPU).
#   bash scripts/lm_eval_suite.sh [STORE]
# -> needle heatmaps in results/figures/needle-*.png, the RULER table in results/lm/ruler.md
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-results/lm/records.jsonl}
AB=${ATTNBENCH:-attnbench}
PY=${PYTHON:-python}
$AB experiment=lm/shakespeare method=dense task.max_len=4096 store="$STORE" runner.checkpoint_dir=results/lm/checkpoints
CKPT=$($PY - "$STORE" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"perplexity"' in l]
print([r for r in recs if r["status"] == "ok"][-1]["details"]["checkpoint"])
PY
)
for task in needle ruler; do
    $AB -m runner=evaluate task=$task model=lm runner.checkpoint="$CKPT" store="$STORE" \
        method=dense,sliding_window || echo "some $task runs failed (their records say why)"
    $AB -m runner=evaluate task=$task model=lm runner.checkpoint="$CKPT" store="$STORE" \
        method=minference method.pattern=a_shape,vertical_slash,block_sparse \
        || echo "some $task runs failed (their records say why)"
done
$PY -m analysis.figures needle --store "$STORE" --out results/figures
$PY -m analysis.figures ruler --store "$STORE" --out results/lm/ruler.md
