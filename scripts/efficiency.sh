#!/usr/bin/env bash
# Efficiency suite: every method's fast path against SDPA (default backend, and flash),
# forward, bf16, B=1, H=32, D=128, causal (4k-128k) and non-causal (4k-64k).
#   bash scripts/efficiency.sh [STORE] [extra Hydra overrides...]
#   PART="causal d64" bash scripts/efficiency.sh ...   (the parts named; default all)
# Parts: causal (dense, flex paths, dense flash), minference (its flex patterns, SparseK's gather path),
# noncausal, triton, backward (dense, sliding window, BigBird, NSA), backward2 (Performer, NSA at its paper
# shape, SparseK, the non-causal methods), 1m, d64. On a host of two GPUs the whole table takes two
# 10-minute windows, one store shared by both (records are appended under a per-run lock):
#   CUDA_VISIBLE_DEVICES=0 PART="causal d64" bash scripts/efficiency.sh &
#   CUDA_VISIBLE_DEVICES=1 PART="minference triton noncausal" bash scripts/efficiency.sh; wait
#   CUDA_VISIBLE_DEVICES=0 PART=backward bash scripts/efficiency.sh &
#   CUDA_VISIBLE_DEVICES=1 PART="backward2 1m" bash scripts/efficiency.sh; wait
# The sparse methods run twice: FlexAttention block masks (impl=flex, the baseline with the
# same mask) and attnbench's Triton kernels (impl=triton, methods/kernels/block_sparse.py).
# Writes records to STORE (default results/efficiency/records.jsonl), then, next to it, the
# leaderboard (leaderboard.md), the latency/memory figures (latency_memory*.png, one per
# setting) and quality against latency (pareto*.png).
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-results/efficiency/records.jsonl}
shift || true
AB=${ATTNBENCH:-attnbench}
# each command's wall time is printed (issue 28, target 5: the whole table in 10 minutes of one GPU)
run() {
    local t0=$SECONDS
    $AB "$@" store="$STORE" || echo "attnbench $* failed (its records say why)"
    echo "efficiency.sh: $(( SECONDS - t0 )) s: $*"
}
want() { [ "${PART:-all}" = all ] || [[ " ${PART} " == *" $1 "* ]]; }

if want causal; then
run -m method=dense,sliding_window,bigbird,nsa,performer experiment=efficiency/causal "$@"
run -m method=dense method.backend=flash experiment=efficiency/causal "$@"
fi
if want minference; then
run -m method=minference method.pattern=a_shape,vertical_slash,block_sparse experiment=efficiency/causal "$@"
# SparseK's gather path is a PyTorch loop over query chunks (no kernel yet): short lengths only
run -m method=sparsek experiment=efficiency/causal 'runner.seq_lens=[4096,16384]' "$@"
fi
if want noncausal; then
run -m method=dense,sliding_window,bigbird,performer,linformer,nystrom experiment=efficiency/noncausal "$@"
run -m method=dense method.backend=flash experiment=efficiency/noncausal "$@"
fi
if want triton; then
run -m method=sliding_window,bigbird,nsa,performer method.impl=triton experiment=efficiency/causal "$@"
run -m method=minference method.pattern=a_shape,vertical_slash,block_sparse method.impl=triton \
    experiment=efficiency/causal "$@"
run -m method=sliding_window,bigbird method.impl=triton experiment=efficiency/noncausal "$@"
# SparseK: per query chunk, its selection kernel then its tile attention kernel
run -m method=sparsek method.impl=triton experiment=efficiency/causal 'runner.seq_lens=[4096,16384,65536]' "$@"
fi
if want backward; then  # forward + backward, trainable paths
run -m method=dense runner.backward=true experiment=efficiency/causal 'runner.seq_lens=[4096,16384,65536]' "$@"
run -m method=sliding_window,bigbird method.impl=flex,triton runner.backward=true \
    experiment=efficiency/causal 'runner.seq_lens=[4096,16384,65536]' "$@"
# NSA trains through flex (default) or its three branches' backward kernels (triton);
# Performer and SparseK, whose Triton paths are forward only, through their default paths
run -m method=nsa method.impl=flex,triton runner.backward=true experiment=efficiency/causal \
    'runner.seq_lens=[4096,16384,65536]' "$@"
fi
if want backward2; then
run -m method=performer runner.backward=true experiment=efficiency/causal 'runner.seq_lens=[4096,16384,65536]' "$@"
# NSA at its paper's shape (64 query heads, 4 KV heads) against dense at the same shape
run -m method=dense runner.backward=true experiment=efficiency/causal model.num_heads=64 model.num_kv_heads=4 \
    'runner.seq_lens=[16384,65536]' "$@"
run -m method=nsa method.impl=triton,flex runner.backward=true experiment=efficiency/causal model.num_heads=64 \
    model.num_kv_heads=4 'runner.seq_lens=[16384,65536]' "$@"
run -m method=sparsek runner.backward=true experiment=efficiency/causal 'runner.seq_lens=[4096,16384]' "$@"
# SparseK's kernels with their backward (methods/kernels/sparsek.py: sparsek_tile_backward)
run -m method=sparsek method.impl=triton runner.backward=true experiment=efficiency/causal \
    'runner.seq_lens=[4096,16384,65536]' "$@"
run -m method=dense,linformer,nystrom runner.backward=true experiment=efficiency/noncausal \
    'runner.seq_lens=[4096,16384,65536]' "$@"
fi
if want 1m; then  # 1M-token prefill: MInference against dense
run -m method=dense experiment=efficiency/causal 'runner.seq_lens=[1048576]' runner.warmup=1 "$@"
run -m method=minference method.pattern=a_shape,vertical_slash,block_sparse method.impl=triton \
    experiment=efficiency/causal 'runner.seq_lens=[1048576]' runner.warmup=1 "$@"
fi

if want d64; then  # head dim 64: the fast paths and both SDPA backends
run -m method=dense method.backend=auto,flash experiment=efficiency/causal model.head_dim=64 "$@"
run -m method=sliding_window,bigbird,nsa,performer method.impl=triton experiment=efficiency/causal \
    model.head_dim=64 "$@"
run -m method=minference method.pattern=a_shape,vertical_slash,block_sparse method.impl=triton \
    experiment=efficiency/causal model.head_dim=64 "$@"
fi

OUT=$(dirname "$STORE")
${PYTHON:-python} -m analysis.leaderboard --store "$STORE" --out "$OUT/leaderboard.md" \
    --plot "$OUT/latency_memory.png" --pareto "$OUT/pareto.png"
