#!/usr/bin/env bash
C=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 ATTNBENCH_GIT_COMMIT=$C ATTNBENCH="python3 -m runners.cli" PYTHON=python3
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=$OUT/r; mkdir -p $O
laneA() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 100 python3 -m pytest -m gpu -q -rs tests/test_kernels.py -k "block_sparse" > $O/gpu_tests_$C.log 2>&1
  timeout 150 python3 scripts/tune_block_sparse.py --lens 65536 --out $O/tune_bs_$C.jsonl --configs 256,128,8,2 128,128,8,3 64,64,4,3 --lazy 0 1 > $O/tune_bs_$C.log 2>&1
}
laneB() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 120 python3 -m runners.cli -m method=sliding_window,bigbird method.impl=triton experiment=efficiency/causal store=$O/records.jsonl hydra.sweep.dir=$O/h1 > $O/triton_$C.log 2>&1
  timeout 120 python3 -m runners.cli -m method=minference method.pattern=a_shape,vertical_slash,block_sparse method.impl=triton experiment=efficiency/causal store=$O/records.jsonl hydra.sweep.dir=$O/h2 >> $O/triton_$C.log 2>&1
}
laneA & laneB & wait
rm -rf $O/h1 $O/h2
cd $OUT && tar czf r.tgz r && rm -rf r
