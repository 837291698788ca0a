#!/usr/bin/env bash
# The real-model table on one GPU: every method that runs causally inside SmolLM2-135M, on
# real text (perplexity at 8k, needle at 4k and 8k with 10 prompts per cell, fidelity and
# recall on captured q/k/v), with prefill time and peak memory; the leaderboard and the
# quality-against-prefill plot (Pareto front marked) beside the records in results/real_model/.
# The model and texts come from the asset cache (python scripts/fetch_assets.py, or
# ATTNBENCH_CACHE pointing at a copy of it).
#   bash scripts/real_model_gpu.sh                  # both parts
#   PART=default bash scripts/real_model_gpu.sh     # each method at its default impl
#   PART=triton bash scripts/real_model_gpu.sh      # the methods with a Triton path, through it
#   METHODS=dense,nsa PART=default bash scripts/real_model_gpu.sh
#   PART=lengths bash scripts/real_model_gpu.sh     # perplexity at 1k, 2k, 4k (8 windows, stride 512)
#                                                   # into results/real_model/lengths/
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${STORE:-results/real_model/records.jsonl}
PART=${PART:-all}
# SparseK's default impl (gather, a PyTorch loop over query chunks) takes seconds per prefill
# at 8k: it is measured through its Triton path only
METHODS=${METHODS:-dense,sliding_window,bigbird,minference,nsa,performer}
TRITON_METHODS=${TRITON_METHODS:-sliding_window,bigbird,minference,nsa,performer,sparsek}
mkdir -p "$(dirname "$STORE")"
sweep() { python3 -m runners.cli -m "$@" task=perplexity,needle,fidelity experiment=real_gpu \
    "task.token_lengths=[4096,8000]" "task.depths=[0.0,0.5,1.0]" store="$STORE"; }
if [ "$PART" = all ] || [ "$PART" = default ]; then sweep "method=$METHODS" "${@}"; fi
if [ "$PART" = all ] || [ "$PART" = triton ]; then sweep "method=$TRITON_METHODS" method.impl=triton "${@}"; fi
if [ "$PART" = lengths ]; then
    LSTORE=${LSTORE:-results/real_model/lengths/records.jsonl}
    mkdir -p "$(dirname "$LSTORE")"
    python3 -m runners.cli -m "method=${LMETHODS:-dense,sliding_window,bigbird,minference}" model=smollm2_135m \
        runner=pretrained task=perplexity task.seq_len=1024,2048,4096 task.prose_windows=8 task.prose_stride=512 \
        store="$LSTORE" "${@}"
    python3 -m analysis.leaderboard --store "$LSTORE" --out "$(dirname "$LSTORE")/leaderboard.md"
    exit 0
fi
OUT=$(dirname "$STORE")
python3 -m analysis.leaderboard --store "$STORE" --out "$OUT/leaderboard.md" --real-pareto "$OUT/pareto.png"
