#!/usr/bin/env bash
# One GPU session, from the source tree alone: the cuda-marked tests, the Triton kernels
# against the torch path, the overhead benchmark with CUDA graphs at Gemma-2-2B's shapes and
# its figures, and the serving-loop example. Logs go to $OUT if set.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
timeout 210 python3 -m pytest -q -m cuda -p no:cacheprovider -p no:logging ${TESTS:-tests/test_cuda.py tests/test_kernels.py tests/test_checkpoints.py} 2>&1 | tee "$out/gpu_tests.log" | tail -40
timeout 120 python3 benchmarks/bench_kernels.py 2>&1 | tee "$out/gpu_kernels.log"
# The overhead benchmark at Gemma-2-2B's shapes (a step that is not host-bound), once per SAE
# (BENCH_SAES), then its figures (plot.py needs matplotlib; it is skipped where that is absent).
for sae in ${BENCH_SAES:-jumprelu16k topk65k}; do
    timeout 300 python3 benchmarks/bench_overhead.py --device cuda --model gemma2-2b --sae "$sae" --warmup 3 --repeats ${REPEATS:-10} ${BENCH_ARGS:-} 2>&1 | grep -v "^warming\|^priming" | tee "$out/gpu_bench_$sae.log"
done
python3 -c "import matplotlib" 2>/dev/null && python3 benchmarks/plot.py benchmarks/results/overhead_cuda*.json
cp benchmarks/results/overhead_cuda*.json benchmarks/results/overhead_cuda*.png benchmarks/results/kernels_cuda.json "$out/" 2>/dev/null
timeout 45 python3 examples/serving_loop.py 2>&1 | grep -v -i warn | tee "$out/gpu_serving.log"
