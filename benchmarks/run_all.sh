#!/usr/bin/env bash
# `make bench`: quantforge's overhead over the libraries it wraps, each target's time and
# memory, and the cross-checks of its evals against llama.cpp's own tools.
# Ratios are measured in one run, side by side; run on an otherwise idle machine.
# Writes benchmarks/results/cpu-<date>/ (one .txt per benchmark, plus JSON where given).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
out=benchmarks/results/cpu-$(date -u +%Y-%m-%d)
mkdir -p "$out"
export OMP_NUM_THREADS=1 QUANTFORGE_THREADS=1 PYTHONUNBUFFERED=1
{
    echo "host: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc --all) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "quantforge $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $($py -c 'import sys; print(sys.version.split()[0])')"
    echo "threads: 1 (OMP_NUM_THREADS=1, QUANTFORGE_THREADS=1)"
} | tee "$out/host.txt"
status=0
run() {
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2> "$out/$name.log" | tee "$out/$name.txt" || status=1
}
run compressed "$py" benchmarks/bench_compressed.py --mini --json "$out/compressed.json"
run gguf "$py" benchmarks/bench_gguf.py --repeat 3
run crosscheck "$py" benchmarks/crosscheck_llamacpp.py
echo "results in $out"
exit $status
