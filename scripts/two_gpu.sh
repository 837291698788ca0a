#!/usr/bin/env bash
# Two GPUs (issue: the one-GPU-per-job sweep and DDP training), on a machine with 2+ GPUs:
#  1. a local multirun of 4 efficiency jobs through hydra/launcher=gpu_pool: each job in its
#     own process that sees only the GPU it took, two at a time;
#  2. the small LM trained with DDP (torchrun, NCCL) on both GPUs, and with one process on
#     one GPU, same global batch and steps; their loss curves compared step by step;
#  3. Star Attention with each GPU one of its hosts (scripts/star_distributed_bench.py; STAR_LENS).
#   bash scripts/two_gpu.sh [OUTDIR]      (default results/multi_gpu)
#   STEPS=... (default 300)  LEN=... (training window, default 1024)
# -> OUTDIR/{sweep.jsonl,single.jsonl,ddp.jsonl,*.log,summary.md}
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/multi_gpu}
AB=${ATTNBENCH:-attnbench}
PY=${PYTHON:-python}
mkdir -p "$OUT"
# NVLink multicast stays off (the GPU host's rule; harmless elsewhere)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L | tee "$OUT/gpus.txt"

# shellcheck disable=SC2086
$AB -m hydra/launcher=gpu_pool experiment=efficiency/causal method=dense,sliding_window,bigbird,performer \
    'runner.seq_lens=[4096,16384,65536]' store="$OUT/sweep.jsonl" hydra.sweep.dir="$OUT/sweep" \
    > "$OUT/sweep.log" 2>&1 || echo "the sweep failed: $OUT/sweep.log"

TRAIN=(experiment=lm/shakespeare task.max_len="${LEN:-1024}" runner.steps="${STEPS:-300}" runner.batch_size=32
       runner.eval_every=100 runner.ckpt_every=100 runner.force=true)
# shellcheck disable=SC2086
$PY -m torch.distributed.run --standalone --nproc_per_node=2 -m runners.cli "${TRAIN[@]}" store="$OUT/ddp.jsonl" \
    runner.checkpoint_dir="$OUT/ck-ddp" hydra.run.dir="$OUT/h-ddp" > "$OUT/ddp.log" 2>&1 || echo "DDP failed: $OUT/ddp.log"
# shellcheck disable=SC2086
CUDA_VISIBLE_DEVICES=0 $AB "${TRAIN[@]}" store="$OUT/single.jsonl" \
    runner.checkpoint_dir="$OUT/ck-single" hydra.run.dir="$OUT/h-single" > "$OUT/single.log" 2>&1 || echo "single failed: $OUT/single.log"
rm -rf "$OUT/ck-ddp" "$OUT/ck-single"
# Star Attention with each GPU a host (issue 25): NCCL, against the one-GPU emulation and dense
$PY -m torch.distributed.run --standalone --nproc_per_node=2 scripts/star_distributed_bench.py \
    --lens ${STAR_LENS:-8192 16384 32768} --out "$OUT/star" > "$OUT/star.log" 2>&1 || echo "star failed: $OUT/star.log"

{
    echo "# Two GPUs: one-GPU-per-job sweep and DDP training"
    echo
    echo "$(date -u +%F) · $(head -c 200 "$OUT/gpus.txt" | tr '\n' ' ')· commit ${ATTNBENCH_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
    echo
    echo "## Sweep: hydra/launcher=gpu_pool, 4 jobs"
    echo
    $PY -m analysis.multi_gpu sweep "$OUT/sweep" "$OUT/sweep.jsonl" || true
    echo
    echo "## DDP (torchrun, NCCL, 2 GPUs) against one process on one GPU"
    echo
    $PY -m analysis.multi_gpu ddp "$OUT/single.jsonl" "$OUT/ddp.jsonl" || true
    echo
    echo "## Star Attention, one host per GPU (scripts/star_distributed_bench.py)"
    echo
    cat "$OUT/star/table.md" 2>/dev/null || echo "(no table: $OUT/star.log)"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
