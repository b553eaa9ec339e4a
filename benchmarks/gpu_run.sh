#!/usr/bin/env bash
# The GPU benchmark runs, as committed under benchmarks/results/: run on a machine with an
# NVIDIA GPU, python3 with torch + transformers, and llm-compressor / nvidia-modelopt importable.
#
#   bash benchmarks/gpu_run.sh compressed OUT_DIR   # GPTQ/AWQ/FP8 of a ~0.95B random Llama, then quantforge eval on CUDA
#   bash benchmarks/gpu_run.sh modelopt OUT_DIR     # ModelOpt NVFP4/FP8/INT4-AWQ: random ~0.45B, and the trained mini demo model
#
# Each step writes JSON into OUT_DIR and its log next to it.
set -euo pipefail
cd "$(dirname "$0")/.."
what=$1
out=$2
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$out/nvidia-smi.csv"
case "$what" in
compressed)
    work=$(mktemp -d)
    python3 benchmarks/gpu_compressed.py --work "$work" --json "$out/gpu_compressed.json" 2> "$out/gpu_compressed.log"
    python3 benchmarks/gpu_eval.py --source "$work/model" \
        --artifact w4a16-gptq=gptq:"$work/out-gptq" --artifact w4a16-awq=awq:"$work/out-awq" --artifact fp8=fp8:"$work/out-fp8" \
        --out "$out/gpu_eval.json" > /dev/null 2> "$out/gpu_eval.log"
    tail -n 40 "$out/gpu_eval.log"
    ;;
modelopt)
    python3 benchmarks/gpu_modelopt.py --random --json "$out/gpu_modelopt_random.json" 2> "$out/gpu_modelopt_random.log"
    mini=$(mktemp -d)
    python3 -m pipeline.sources.tiny tiny-llama-mini "$mini" > "$out/train_mini.log" 2>&1
    python3 benchmarks/gpu_modelopt.py --model "$mini" --kv-cache-quant fp8 --json "$out/gpu_modelopt_mini.json" 2> "$out/gpu_modelopt_mini.log"
    ;;
*)
    echo "usage: $0 compressed|modelopt OUT_DIR" >&2
    exit 2
    ;;
esac
