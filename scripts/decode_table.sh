#!/usr/bin/env bash
# The decode leaderboard (issue 24): runner=decode for dense decode (the reference) and the
# methods with a decode path over context lengths, then the table and the two plots
# (analysis.leaderboard --decode-dir): OUT/decode_table.md, OUT/step_latency.png (step latency
# against context length) and OUT/recall_vs_bytes.png (recall against bytes read per step),
# and OUT/speedup.md (scripts/decode_speedup.py: each method's step time against dense decode's).
#   bash scripts/decode_table.sh                       # GPU: bf16, H=32 Hkv=8 D=128, L = 1k ... 128k
#   SIZE=cpu OUT=results/decode/cpu bash scripts/decode_table.sh   # CPU sizes (minutes)
#   REPORT_ONLY=1 bash scripts/decode_table.sh         # the table and plots again from the records
#   METHODS=all BUDGET=2048 SEQ_LENS=32768,131072 bash scripts/decode_table.sh
#       # every method with a decode path; the selectors read BUDGET keys per step (each under its
#       # own name: token_budget, k, top_k; Squeezed Attention has no budget, Twilight's is its
#       # base's before top-p); the prefill lengths and STEPS (default 32) as given
#   QUEST_PAGE=64 (default; 0: none): when METHODS has quest, one extra row, clearly not the
#       default configuration: Quest with pages of QUEST_PAGE keys at the longest length
#       (labelled by its page_size in the table); its page summaries, 2 L / page_size rows per
#       KV head per step, are the bound on Quest's speed-up at 128k with the official pages of 16
# Extra arguments are Hydra overrides for every run (e.g. runner.inputs=random).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/decode}
STORE=${STORE:-$OUT/records.jsonl}
AB=${ATTNBENCH:-attnbench}
METHODS=${METHODS:-dense,quest,sparq,streaming_llm,sliding_window,nsa,sparsek,lightning,performer}
ALL=dense,quest,sparq,loki,double_sparsity,tidal_decode,twilight,retrieval_attention,squeezed_attention
ALL=$ALL,streaming_llm,sliding_window,nsa,sparsek,lightning,performer
[ "$METHODS" = all ] && METHODS=$ALL
budget_of() {  # the override that sets a selector's budget to $BUDGET keys (none: no budget)
    case $1 in
        quest|double_sparsity|tidal_decode|twilight) echo "++method.token_budget=$BUDGET" ;;
        sparq|loki) echo "++method.k=$BUDGET" ;;
        retrieval_attention) echo "++method.top_k=$BUDGET" ;;
    esac
}
if [ -z "${REPORT_ONLY:-}" ]; then
    if [ "${SIZE:-gpu}" = cpu ]; then
        LENS=${SEQ_LENS:-256,1024}
        BASE=(device=cpu dtype=float32 model.num_heads=4 model.num_kv_heads=2 model.head_dim=16
              "runner.steps=${STEPS:-8}" runner.warmup=1 runner.cpu_threads=2)
    else
        LENS=${SEQ_LENS:-1024,4096,16384,32768,131072}
        BASE=(device=cuda dtype=bfloat16 model.num_heads=32 model.num_kv_heads=8 model.head_dim=128
              "runner.steps=${STEPS:-32}")
    fi
    ARGS=("${BASE[@]}" "runner.seq_lens=[$LENS]")
    if [ -z "${BUDGET:-}" ]; then
        $AB -m runner=decode "method=$METHODS" "store=$STORE" "${ARGS[@]}" "$@" \
            || echo "decode_table: some runs failed (their records say why)"
    else  # one sweep per budget name (the methods that take it; "none": the rest), in the order
        # the names first appear in METHODS; dense decode, the baseline, first of all
        declare -A GROUPS_=()
        ORDER=()
        for m in ${METHODS//,/ }; do
            b=$(budget_of "$m")
            b=${b:-none}
            [ "$m" = dense ] && b=dense
            [ -z "${GROUPS_[$b]:-}" ] && ORDER+=("$b")
            GROUPS_[$b]="${GROUPS_[$b]:+${GROUPS_[$b]},}$m"
        done
        for b in "${ORDER[@]}"; do
            extra=${b#none}
            extra=${extra#dense}
            $AB -m runner=decode "method=${GROUPS_[$b]}" "store=$STORE" "${ARGS[@]}" $extra "$@" \
                || echo "decode_table: some runs of ${GROUPS_[$b]} failed (their records say why)"
        done
    fi
    if [ "${QUEST_PAGE:-64}" != 0 ] && [[ ",$METHODS," == *,quest,* ]]; then
        # the extra Quest row: larger pages at the longest length (not the default configuration)
        $AB -m runner=decode method=quest "store=$STORE" "${BASE[@]}" "runner.seq_lens=[${LENS##*,}]" \
            "++method.page_size=${QUEST_PAGE:-64}" ${BUDGET:+$(budget_of quest)} "$@" \
            || echo "decode_table: the Quest page_size=${QUEST_PAGE:-64} row failed (its record says why)"
    fi
fi
${PYTHON:-python} -m analysis.leaderboard --store "$STORE" --decode-dir "$OUT" | grep "^decode report"
${PYTHON:-python} scripts/decode_speedup.py --store "$STORE" --out "$OUT/speedup.md"
