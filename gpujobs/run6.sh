#!/usr/bin/env bash
C=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 ATTNBENCH_GIT_COMMIT=$C ATTNBENCH="python3 -m runners.cli" PYTHON=python3
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=$OUT/r; mkdir -p $O
laneA() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 120 python3 -m pytest -m gpu -q -rs tests/test_sparse.py tests/test_kernels.py -k "sparsek or nsa" > $O/gpu_tests_$C.log 2>&1
  timeout 60 python3 scripts/profile_method.py sparsek --seq-len 65536 impl=triton > $O/profile_sparsek_$C.log 2>&1
  timeout 70 python3 scripts/profile_method.py nsa --heads 64 --kv-heads 4 impl=triton > $O/profile_nsa_$C.log 2>&1
  timeout 120 python3 scripts/peers.py --suites nsa --out $O/peers.jsonl > $O/peers_$C.log 2>&1 || echo peers rc $? >> $O/peers_$C.log
}
laneB() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 200 python3 -m runners.cli -m method=sparsek,nsa method.impl=triton experiment=efficiency/causal store=$O/records.jsonl hydra.sweep.dir=$O/h1 > $O/triton_$C.log 2>&1
}
laneA & laneB & wait
rm -rf $O/h1
cd $OUT && tar czf r.tgz r && rm -rf r
