#!/usr/bin/env bash
# Set quantforge up on a machine without internet that already has Python and torch (a GPU
# image, say): the documented offline path of `make setup`.
#
#   scripts/setup_offline.sh WHEELS_DIR LLAMA_CPP_SOURCE SITE_DIR
#
# WHEELS_DIR: wheels of quantforge's dependencies for that machine's Python, downloaded on a
#   connected machine (README, "Offline GPU machines"), plus the llama-cpp-python wheel built
#   with LLAMA_BUILD=OFF (scripts/build_llama_cpp.sh makes it: ~/.cache/quantforge/wheels/).
# LLAMA_CPP_SOURCE: the llama-cpp-python sdist (or an archive of it without llama.cpp's docs,
#   models, tests and examples: the build needs only vendor/llama.cpp and CHANGELOG.md).
# SITE_DIR: where the packages go (`pip install --target`); then
#   export PYTHONPATH=SITE_DIR:<this checkout>  and run  python -m pipeline.cli.main ...
# llama.cpp is built once into $QUANTFORGE_CACHE (default ~/.cache/quantforge): with CUDA for the
# GPU's own architecture when nvcc and an NVIDIA GPU are there, as `make setup` does.
set -euo pipefail
if [[ $# -ne 3 ]]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi
WHEELS=$(cd "$1" && pwd)
SOURCE=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
SITE=$3
CACHE=${QUANTFORGE_CACHE:-$HOME/.cache/quantforge}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$SITE" "$CACHE/wheels"
start=$(date +%s)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
cp "$WHEELS"/llama_cpp_python-*.whl "$CACHE/wheels/" 2>/dev/null || true
echo "[setup_offline] $(ls "$WHEELS"/*.whl | wc -l) wheels installed into $SITE in $(( $(date +%s) - start )) s" >&2
LLAMA_CPP_SDIST="$SOURCE" bash "$REPO/scripts/build_llama_cpp.sh" "$CACHE" /bin/false >/dev/null
# The binding is built without llama.cpp: link the build into its package (a plain `import llama_cpp` then works).
QUANTFORGE_CACHE="$CACHE" PYTHONPATH="$SITE:$REPO" "$PY" -m pipeline.backends.llamacpp link-libraries >&2
echo "[setup_offline] done in $(( $(date +%s) - start )) s; now: export PYTHONPATH=$SITE:$REPO QUANTFORGE_CACHE=$CACHE" >&2
