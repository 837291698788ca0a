#!/usr/bin/env bash
C=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
O=$OUT/r; mkdir -p $O
(export CUDA_VISIBLE_DEVICES=0
timeout 60 python3 -m pytest -q -m gpu tests/test_kernels.py -k "nsa" > $O/gpu_tests_nsa_$C.log 2>&1
timeout 200 python3 scripts/tune_nsa.py --out $O/tune_nsa_$C.jsonl > $O/tune_nsa_$C.log 2>&1
timeout 60 python3 scripts/profile_method.py nsa --seq-len 65536 --heads 64 --kv-heads 4 impl=triton > $O/profile_nsa_$C.log 2>&1
) &
(export CUDA_VISIBLE_DEVICES=1
timeout 240 python3 scripts/tune_nsa.py --heads 32 --kv-heads 32 --out $O/tune_nsa_mha_$C.jsonl > $O/tune_nsa_mha_$C.log 2>&1
timeout 60 python3 scripts/profile_method.py nsa --seq-len 65536 --heads 32 impl=triton > $O/profile_nsa_mha_$C.log 2>&1
) &
wait
cd $OUT && tar czf r.tgz r && rm -rf r
