#!/usr/bin/env bash
C=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 ATTNBENCH_GIT_COMMIT=$C ATTNBENCH="python3 -m runners.cli" PYTHON=python3
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=$OUT/r; mkdir -p $O
laneA() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 170 python3 -m pytest -m gpu -q -rs tests/test_kernels.py tests/test_sparse.py -k "block_sparse or fast_path or nsa" > $O/gpu_tests_$C.log 2>&1
  timeout 150 python3 scripts/tune_block_sparse.py --lens 65536 --out $O/tune_bs_$C.jsonl --configs 64,64,4,3,0 64,64,4,3,1 64,64,4,3,1,1 128,64,8,3,0 128,64,8,3,1 64,64,4,2,1 > $O/tune_bs_$C.log 2>&1
  timeout 120 python3 scripts/peers.py --suites nsa --out $O/peers.jsonl > $O/peers_$C.log 2>&1 || echo peers rc $? >> $O/peers_$C.log
}
laneB() {
  export CUDA_VISIBLE_DEVICES=1
  FIGDIR=$O/fig PART=triton timeout 480 bash scripts/efficiency.sh $O/records.jsonl > $O/triton_$C.log 2>&1
}
laneA & laneB & wait
rm -rf $O/h
cd $OUT && tar czf r.tgz r && rm -rf r
