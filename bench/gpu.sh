#!/usr/bin/env bash
# The speed benchmark of bench/speed.py on one GPU, bf16, with a T5-large-sized and a 1B LLaMA-style
# (TinyLlama-1.1B shape) random config; query/value-style and all-linear targets; batch 32 × 128
# tokens (T5 decoder: 32). A few minutes on an H200, model construction included; each model is
# capped at 230 s. Run from the repository root:
#
#     bash bench/gpu.sh          # tables in bench_gpu_<model>.txt, raw numbers in .json (under $OUT if set)
#
# Needs torch with CUDA, transformers and peft; jumplora is taken from src/ if it is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dest="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
status=0
for model in t5-large llama-1b; do
    timeout 230 python3 bench/speed.py --device cuda --dtype bf16 --models "$model" --targets qv,all \
        --batch 32 --seq 128 --dec-seq 32 --repeats 10 --warmup 2 --infer-all \
        --json "$dest/bench_gpu_$model.json" 2>&1 | grep -v -E "Warning|warnings.warn" | tee "$dest/bench_gpu_$model.txt"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "bench/speed.py on $model failed with exit code $rc"; status=1; }
done
exit $status
