#!/usr/bin/env bash
# One GPU session, from the source tree alone: the cuda-marked tests, the Triton kernels
# against the torch path, the overhead benchmark with CUDA graphs, and the serving-loop
# example. Logs go to $OUT if set.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
timeout 210 python3 -m pytest -q -m cuda -p no:cacheprovider -p no:logging ${TESTS:-tests/test_cuda.py tests/test_kernels.py tests/test_checkpoints.py} 2>&1 | tee "$out/gpu_tests.log" | tail -40
timeout 120 python3 benchmarks/bench_kernels.py 2>&1 | tee "$out/gpu_kernels.log"
timeout 300 python3 benchmarks/bench_overhead.py --device cuda --warmup 5 --repeats ${REPEATS:-20} ${BENCH_ARGS:-} 2>&1 | grep -v "^warming\|^priming" | tee "$out/gpu_bench.log"
cp benchmarks/results/overhead_cuda.json benchmarks/results/kernels_cuda.json "$out/" 2>/dev/null
timeout 45 python3 examples/serving_loop.py 2>&1 | grep -v -i warn | tee "$out/gpu_serving.log"
