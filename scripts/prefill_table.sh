#!/usr/bin/env bash
# The prefill-sparsity table (issue 25) on one GPU: every prefill method (SampleAttention,
# SpargeAttn, HyperAttention, SeerAttention at its threshold and top-k points, MoA, S2, Star,
# HiP, MInference vertical-slash, NSA) and dense SDPA (cuDNN), in two parts of one device call each:
#   PART=kernel  the attention operation alone at SmolLM2-135M's head layout (B=1, H=9, Hkv=3,
#                D=64, bf16, causal) at 8k, 32k and 128k tokens (runner=kernel): index time,
#                attention time, total, density, and attention recall on the fidelity task's
#                structured inputs of each length (1024 query rows sampled)
#   PART=real    SmolLM2-135M with every layer through the method at 8k (runner=pretrained):
#                perplexity (2 windows of 8192 tokens of Austen), needle at 8000 tokens
#                (depths 0, 0.5, 1; 5 prompts each), recall and density on q/k/v captured from
#                the model (layers 0, 10, 20, 29), the model's prefill time and its index time
#   PART=ruler   SmolLM2-135M through each method on RULER-like NIAH tasks (niah_single,
#                niah_multivalue, niah_multiquery; 4 prompts each) at 2000 and 4000 tokens (at
#                8000 the dense model answers none of it: results/kv_compression/ruler_probe.md),
#                the prompt through the method's prefill, then decode steps on the KV cache
#                (task.generation=cache, MInference's protocol: one prefill a prompt; a full
#                prefill per generated token took ~1 min a prompt on a shared H200, session 15)
# then results/prefill/table.md and recall_vs_time.png (python -m analysis.prefill).
#   PART=kernel bash scripts/prefill_table.sh     # GPU call 1
#   PART=real bash scripts/prefill_table.sh       # GPU call 2 (trains SeerAttention's gate first
#                                                 # where SEER_GATE is absent: SEER_STEPS per layer)
#   PART=ruler bash scripts/prefill_table.sh      # GPU call 3 (the trained gate from call 2)
#   REPORT_ONLY=1 bash scripts/prefill_table.sh   # the table and figure again from the records
#   SIZE=cpu OUT=/tmp/prefill bash scripts/prefill_table.sh   # the whole pipeline at tiny lengths on CPU
# RULER_LENS / RULER_TASKS / RULER_TRIALS / RULER_TOKENS resize the RULER part (Hydra lists for the
# first two). DENSE / TRITON_METHODS / SEER / FLEX_METHODS / REF_METHODS narrow a part (comma lists, "" for
# none); KLENS1 (first pass, every method) and KLENS2 (second pass, not HyperAttention) are the
# kernel lengths. Each part stops starting runs after BUDGET_S seconds (default 510) and cuts
# the run in progress there; runs whose ok record exists are skipped, so the same command again
# resumes where it stopped. Extra arguments are Hydra overrides for every run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1   # progress lines as they happen (a device call's stdout is a pipe)
OUT=${OUT:-results/prefill}
KSTORE=${KSTORE:-$OUT/kernel.jsonl}
RSTORE=${RSTORE:-$OUT/real.jsonl}
AB=${ATTNBENCH:-attnbench}
PY=${PYTHON:-python}
PART=${PART:-all}
SIZE=${SIZE:-gpu}
CACHE=${ATTNBENCH_CACHE:-$HOME/.cache/attnbench}
# SeerAttention's gate file: SEER_GATE, else scripts/train_seer_gate.py's default name in the
# cache, else the name the earlier GPU session used (seer_gates/gate.pt); trained where absent
SEER_GATE=${SEER_GATE:-$CACHE/seer_gates/smollm2_135m_b179c9523d0e_b64_h128.pt}
[ -f "$SEER_GATE" ] || [ ! -f "$CACHE/seer_gates/gate.pt" ] || SEER_GATE=$CACHE/seer_gates/gate.pt
SEER_STEPS=${SEER_STEPS:-100}
# the paths: Triton where the method has one, FlexAttention for HiP, the reference for
# HyperAttention (its only path: dense weights, true quality, not true speed)
DENSE=${DENSE-dense}
TRITON_METHODS=${TRITON_METHODS-minference,nsa,sample_attention,sparge,moa,s2_attention,star_attention}
SEER=${SEER-seer_attention}
FLEX_METHODS=${FLEX_METHODS-hip}
REF_METHODS=${REF_METHODS-hyper_attention}
mkdir -p "$OUT"

if [ "$SIZE" = cpu ]; then
    KARGS=(device=cpu dtype=float32 model.num_heads=4 model.num_kv_heads=2 model.head_dim=16
           task.max_len=256 runner.warmup=1 runner.repeats=2
           runner.gate_len=128 +runner.recall_rows=64)
    RARGS=(experiment=real device=cpu task.seq_len=512 "task.token_lengths=[512]" "task.depths=[0.0,1.0]"
           task.trials=1 task.batch_size=2 "task.layers=[0,29]" runner.timing_len=512 impl=null)
    RULER=(experiment=real device=cpu "task.token_lengths=${RULER_LENS:-[256]}" "task.tasks=${RULER_TASKS:-[niah_single]}"
           "task.trials=${RULER_TRIALS:-1}" "task.max_new_tokens=${RULER_TOKENS:-4}" task.generation=cache
           runner.timing_len=256 impl=null)
    SEER_TRAIN=(--device cpu --seq-len 256 --windows 2 --steps 2)
    # at these lengths HiP's top-k and HyperAttention's exact threshold are scaled down
    HIP=(method.top_k=64 method.window=32)
    DENSE_BACKEND=auto   # no cuDNN on a CPU
    # inside the model on a CPU the fast paths fall back to eager FlexAttention (tens of seconds a
    # forward): the reference paths there; the kernel part keeps the GPU's impls (their fallbacks)
    RFAST=reference RFLEX=reference
    KLENS1=${KLENS1-[256]}
    KLENS2=${KLENS2-[512]}
    HYPER=(method.min_seq_len=128 method.block_size=64 method.sample_size=64)
else
    KARGS=(device=cuda dtype=bfloat16 model.num_heads=9 model.num_kv_heads=3 model.head_dim=64
           task.max_len=4096 runner.warmup=3 runner.rep_ms=50
           +runner.recall_rows=1024)
    RARGS=(experiment=real_gpu task.seq_len=8192 task.prose_windows=2 "task.token_lengths=[8000]"
           "task.depths=[0.0,0.5,1.0]" task.trials=5 runner.repeats=5 "+runner.timed_tasks=[perplexity]")
    RULER=(experiment=real_gpu "task.token_lengths=${RULER_LENS:-[2000,4000]}"
           "task.tasks=${RULER_TASKS:-[niah_single,niah_multivalue,niah_multiquery]}" "task.trials=${RULER_TRIALS:-4}"
           "task.max_new_tokens=${RULER_TOKENS:-24}" task.generation=cache "+runner.timed_tasks=[perplexity]")
    SEER_TRAIN=(--device cuda --seq-len 4096 --windows 8 --steps "$SEER_STEPS")
    HIP=()
    HYPER=()
    RFAST=triton RFLEX=flex
    DENSE_BACKEND=${DENSE_BACKEND:-auto}   # PyTorch's pick, named in the records: cuDNN on the H200 at
                                          # these shapes (results/efficiency); DENSE_BACKEND=cudnn forces it
    KLENS1=${KLENS1-[8192,32768]}
    KLENS2=${KLENS2-[131072]}
fi
BUDGET_S=${BUDGET_S:-510}
KARGS+=(runner.causal=true runner.backward=false "store=$KSTORE")
RARGS+=(task=perplexity,needle,fidelity "store=$RSTORE")
RULER=(task=ruler "${RULER[@]}" "store=$RSTORE")
# SeerAttention: the trained gate where it exists (the kernel part runs layer 0's gate: this is
# SmolLM2's head layout), else the untrained gate, which the records then name
if [ -f "$SEER_GATE" ]; then SEER_ARGS=(method.gate=trained "method.gate_path=$SEER_GATE");
else SEER_ARGS=(method.gate=untrained); fi

# every attnbench call gets the part's time left (BUDGET_S per part, default 510 s: a device call
# of 9 minutes with room for the report); what does not fit is skipped and said so, and a re-run
# of the part resumes there (finished records are skipped)
run() {
    local left=$((BUDGET_S - $(date +%s) + PART_START))
    if [ "$left" -lt 20 ]; then echo "prefill_table: part budget ${BUDGET_S}s spent: skipped attnbench $*"; return 0; fi
    timeout "$left" $AB "$@" || echo "prefill_table: attnbench $* failed or ran out of time (records say what finished)"
}
group() {  # group <lengths or ""> <fast impl> <flex impl> <extra overrides...>: every method group once
    local lens=$1 fast=$2 flex=$3; shift 3
    local L=(); [ -n "$lens" ] && L=("runner.seq_lens=$lens")
    [ -n "$DENSE" ] && run -m "$@" method=dense "method.backend=$DENSE_BACKEND" "${L[@]}" "${EXTRA[@]}"
    [ -n "$TRITON_METHODS" ] && run -m "$@" "method=$TRITON_METHODS" "method.impl=$fast" "${L[@]}" "${EXTRA[@]}"
    [ -n "$SEER" ] && run -m "$@" method=seer_attention "method.impl=$fast" method.selection=threshold,topk \
        "${SEER_ARGS[@]}" "${L[@]}" "${EXTRA[@]}"
    [ -n "$FLEX_METHODS" ] && run -m "$@" "method=$FLEX_METHODS" "method.impl=$flex" "${HIP[@]}" "${L[@]}" "${EXTRA[@]}"
    return 0
}
EXTRA=("$@")
if [ -z "${REPORT_ONLY:-}" ] && { [ "$PART" = all ] || [ "$PART" = kernel ]; }; then
    PART_START=$(date +%s)
    echo "prefill_table: kernel part, $(date -u +%T), budget ${BUDGET_S}s"
    # length-major: every method at the short lengths first, then the longest
    group "$KLENS1" triton flex runner=kernel "${KARGS[@]}"
    # HyperAttention's reference builds [T, T] weights: the short lengths only
    [ -n "$REF_METHODS" ] && run -m runner=kernel "method=$REF_METHODS" "${HYPER[@]}" "${KARGS[@]}" \
        "runner.seq_lens=$KLENS1" "${EXTRA[@]}"
    [ -n "$KLENS2" ] && group "$KLENS2" triton flex runner=kernel "${KARGS[@]}"
fi
if [ -z "${REPORT_ONLY:-}" ] && { [ "$PART" = all ] || [ "$PART" = real ]; }; then
    PART_START=$(date +%s)
    echo "prefill_table: real-model part, $(date -u +%T), budget ${BUDGET_S}s"
    if [ -n "$SEER" ] && [ ! -f "$SEER_GATE" ]; then
        echo "prefill_table: training SeerAttention's gate into $SEER_GATE ($(date -u +%T))"
        if timeout "$((BUDGET_S / 3))" $PY scripts/train_seer_gate.py "${SEER_TRAIN[@]}" --out "$SEER_GATE" \
                && [ -f "$SEER_GATE" ]; then
            SEER_ARGS=(method.gate=trained "method.gate_path=$SEER_GATE")
        else
            echo "prefill_table: gate training failed or ran out of time: SeerAttention runs its untrained gate"
        fi
    fi
    group "" "$RFAST" "$RFLEX" "${RARGS[@]}"
    [ -n "$REF_METHODS" ] && run -m "method=$REF_METHODS" "${HYPER[@]}" "${RARGS[@]}" "${EXTRA[@]}"
fi
if [ -z "${REPORT_ONLY:-}" ] && { [ "$PART" = all ] || [ "$PART" = ruler ]; }; then
    PART_START=$(date +%s)
    echo "prefill_table: RULER part, $(date -u +%T), budget ${BUDGET_S}s"
    group "" "$RFAST" "$RFLEX" "${RULER[@]}"
    [ -n "$REF_METHODS" ] && run -m "method=$REF_METHODS" "${HYPER[@]}" "${RULER[@]}" "${EXTRA[@]}"
fi
echo "prefill_table: report, $(date -u +%T)"
$PY -m analysis.prefill --kernel "$KSTORE" --real "$RSTORE" --out "$OUT"   # real rows alone where no kernel part ran
