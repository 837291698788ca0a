#!/usr/bin/env bash
# The real-model table on one GPU: every method that runs causally inside SmolLM2-135M, on
# real text (perplexity at 8k, needle at 4k and 8k with 10 prompts per cell, fidelity and
# recall on captured q/k/v), with prefill time and peak memory; the leaderboard beside the
# records in results/real_model/. The model and texts come from the asset cache
# (python scripts/fetch_assets.py, or ATTNBENCH_CACHE pointing at a copy of it).
#   bash scripts/real_model_gpu.sh                  # all methods
#   METHODS=dense,nsa bash scripts/real_model_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${STORE:-results/real_model/records.jsonl}
METHODS=${METHODS:-dense,sliding_window,bigbird,minference,nsa,performer,sparsek}
mkdir -p "$(dirname "$STORE")"
python3 -m runners.cli -m "method=$METHODS" task=perplexity,needle,fidelity experiment=real_gpu \
    "task.token_lengths=[4096,8000]" "task.depths=[0.0,0.5,1.0]" store="$STORE" "$@"
python3 -m analysis.leaderboard --store "$STORE" --out "$(dirname "$STORE")/leaderboard.md"
