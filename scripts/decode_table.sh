#!/usr/bin/env bash
# The decode leaderboard (issue 24): runner=decode for dense decode (the reference) and the
# methods with a decode path over context lengths, then the table and the two plots
# (analysis.leaderboard --decode-dir): OUT/decode_table.md, OUT/step_latency.png (step latency
# against context length) and OUT/recall_vs_bytes.png (recall against bytes read per step).
#   bash scripts/decode_table.sh                       # GPU: bf16, H=32 Hkv=8 D=128, L = 1k ... 128k
#   SIZE=cpu OUT=results/decode/cpu bash scripts/decode_table.sh   # CPU sizes (minutes)
#   REPORT_ONLY=1 bash scripts/decode_table.sh         # the table and plots again from the records
# Extra arguments are Hydra overrides for every run (e.g. runner.inputs=random).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/decode}
STORE=${STORE:-$OUT/records.jsonl}
AB=${ATTNBENCH:-attnbench}
METHODS=${METHODS:-dense,quest,sparq,streaming_llm,sliding_window,nsa,sparsek,lightning,performer}
if [ -z "${REPORT_ONLY:-}" ]; then
    if [ "${SIZE:-gpu}" = cpu ]; then
        ARGS=(device=cpu dtype=float32 model.num_heads=4 model.num_kv_heads=2 model.head_dim=16
              "runner.seq_lens=[256,1024]" runner.steps=8 runner.warmup=1 runner.cpu_threads=2)
    else
        ARGS=(device=cuda dtype=bfloat16 model.num_heads=32 model.num_kv_heads=8 model.head_dim=128
              "runner.seq_lens=[1024,4096,16384,32768,131072]" runner.steps=32)
    fi
    $AB -m runner=decode "method=$METHODS" "store=$STORE" "${ARGS[@]}" "$@" \
        || echo "decode_table: some runs failed (their records say why)"
fi
${PYTHON:-python} -m analysis.leaderboard --store "$STORE" --decode-dir "$OUT" | grep "^decode report"
