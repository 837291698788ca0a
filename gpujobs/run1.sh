#!/usr/bin/env bash
C=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 ATTNBENCH_GIT_COMMIT=$C ATTNBENCH="python3 -m runners.cli" PYTHON=python3
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=$OUT/r; mkdir -p $O
nvidia-smi -L > $O/gpus.txt; python3 -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $O/gpus.txt
laneA() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python3 -m pytest -m gpu -q -rs tests/test_kernels.py tests/test_sparse.py > $O/gpu_tests_$C.log 2>&1
  timeout 120 python3 scripts/tune_nsa.py --out $O/tune_nsa_$C.jsonl > $O/tune_nsa_$C.log 2>&1
  timeout 70 python3 scripts/profile_method.py nsa --heads 64 --kv-heads 4 impl=triton > $O/profile_nsa_$C.log 2>&1
  timeout 150 python3 scripts/peers.py --suites nsa --out $O/peers.jsonl > $O/peers_$C.log 2>&1 || echo peers rc $? >> $O/peers_$C.log
}
laneB() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 100 python3 scripts/tune_block_sparse.py --lens 65536 --out $O/tune_bs_$C.jsonl > $O/tune_bs_$C.log 2>&1
  timeout 130 python3 -m runners.cli -m method=sparsek method.impl=triton experiment=efficiency/causal 'runner.seq_lens=[4096,16384,65536]' store=$O/records.jsonl hydra.sweep.dir=$O/h1 > $O/sparsek_$C.log 2>&1
  timeout 170 python3 -m runners.cli -m method=nsa,performer runner.backward=true experiment=efficiency/causal 'runner.seq_lens=[4096,16384,65536]' store=$O/records.jsonl hydra.sweep.dir=$O/h2 > $O/backward_$C.log 2>&1
  timeout 100 python3 -m runners.cli -m method=sparsek runner.backward=true experiment=efficiency/causal 'runner.seq_lens=[4096,16384]' store=$O/records.jsonl hydra.sweep.dir=$O/h3 >> $O/backward_$C.log 2>&1
}
laneA & laneB & wait
rm -rf $O/h1 $O/h2 $O/h3
cd $OUT && tar czf r.tgz r && rm -rf r
