#!/usr/bin/env bash
C=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 ATTNBENCH_GIT_COMMIT=$C ATTNBENCH="python3 -m runners.cli" PYTHON=python3
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=$OUT/r; mkdir -p $O
(
export CUDA_VISIBLE_DEVICES=0
timeout 150 python3 -m pytest -q -m gpu tests/test_sparse.py tests/test_kernels.py -k "sparsek or nsa or block_sparse" > $O/gpu_tests_$C.log 2>&1
timeout 200 python3 scripts/tune_nsa.py --kernels compressed importance --out $O/tune_nsa_$C.jsonl > $O/tune_nsa_$C.log 2>&1
timeout 90 python3 scripts/profile_method.py nsa --seq-len 65536 --heads 64 --kv-heads 4 impl=triton > $O/profile_nsa_$C.log 2>&1
timeout 60 python3 scripts/profile_method.py nsa --seq-len 65536 --heads 32 impl=triton > $O/profile_nsa_mha_$C.log 2>&1
) &
(
export CUDA_VISIBLE_DEVICES=1
timeout 300 $ATTNBENCH -m method=dense,linformer,nystrom runner.backward=true experiment=efficiency/noncausal 'runner.seq_lens=[4096,16384,65536]' store=$O/records.jsonl hydra.sweep.dir=$O/h1 > $O/backward_lin_$C.log 2>&1
timeout 200 python3 scripts/peers.py --suites nsa --lens 16384 65536 --out $O/peers.jsonl > $O/peers_$C.log 2>&1
) &
wait
nvidia-smi --query-gpu=name,driver_version --format=csv > $O/gpu.txt
cd $OUT && tar czf r.tgz r && rm -rf r
