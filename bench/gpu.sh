#!/usr/bin/env bash
# The GPU checks of the JumpLoRA layer, one prepared script (about 7 minutes on an H200):
#
#  1. tests/test_kernels.py with the Triton kernels compiled for the GPU (TRITON_INTERPRET=0);
#  2. bench/speed.py in bf16 with a T5-large-sized and a 1B LLaMA-style (TinyLlama-1.1B shape) random
#     config, query/value-style and all-linear targets, batch 32 × 128 tokens (T5 decoder: 32), with our
#     layer both on its Triton kernels and on torch ops, and the ops/kernels each step issues.
#
# Run from the repository root:
#
#     bash bench/gpu.sh     # tables in bench_gpu_<model>.txt, raw numbers in .json (under $OUT if set)
#
# Needs torch with CUDA, Triton, transformers and peft; jumplora is taken from src/ if it is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
dest="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| triton', triton.__version__)"
status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -15 | tee "$dest/gpu_kernel_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "kernel tests failed"; status=1; }
for model in t5-large llama-1b; do
    timeout 270 python3 bench/speed.py --device cuda --dtype bf16 --models "$model" --targets qv,all \
        --batch 32 --seq 128 --dec-seq 32 --repeats 8 --warmup 2 --infer-all --torch-ops --count-ops \
        --json "$dest/bench_gpu_$model.json" 2>&1 | grep -v -E "Warning|warnings.warn|_warn_once" | tee "$dest/bench_gpu_$model.txt"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "bench/speed.py on $model failed with exit code $rc"; status=1; }
done
exit $status
