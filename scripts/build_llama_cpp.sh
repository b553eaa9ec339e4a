#!/usr/bin/env bash
# Build llama.cpp for quantforge, once per version, into a cache folder:
#   1. the llama-cpp-python sdist (source only on PyPI), downloaded with pip;
#   2. its wheel (the Python binding `llama_cpp`), built with GGML_NATIVE=OFF;
#   3. llama.cpp's CLI tools (llama-imatrix, llama-perplexity, llama-bench,
#      llama-quantize) from the SAME sdist's vendor/llama.cpp, so the binding and
#      the tools read and write the same file formats (imatrix, GGUF versions).
#
# Usage: scripts/build_llama_cpp.sh CACHE_DIR VENV_PIP
# Env: LLAMA_CPP_PYTHON_VERSION (0.3.36), LLAMA_CPP_BUILD_JOBS (2),
#      BUILD_WHEEL=0 to build only the tools.
# Idempotent: each step is skipped when its output exists. Outputs appear
# atomically (built under a temp name, then renamed), so an interrupted build
# is redone, never half-used.
#
# Why GGML_NATIVE=OFF: the native build picks AMX on these CPUs and every
# quantized GGUF then segfaults on its first decode (llama.cpp issue 20824). The portable build is what we ship and measure.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 CACHE_DIR VENV_PIP" >&2
    exit 2
fi
CACHE_DIR=$(mkdir -p "$1" && cd "$1" && pwd)
VENV_PIP=$2
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${LLAMA_CPP_BUILD_JOBS:-2}
TOOLS=(llama-imatrix llama-perplexity llama-bench llama-quantize)

SDIST="$CACHE_DIR/sdist/llama_cpp_python-$VERSION.tar.gz"
SRC="$CACHE_DIR/src/llama_cpp_python-$VERSION"
WHEELS="$CACHE_DIR/wheels"
TOOLS_DIR="$CACHE_DIR/llama.cpp-$VERSION"

log() { echo "[build_llama_cpp] $*" >&2; }

# 1. The sdist ---------------------------------------------------------------
if [[ ! -f "$SDIST" ]]; then
    log "downloading llama-cpp-python==$VERSION sdist"
    tmp=$(mktemp -d "$CACHE_DIR/.sdist-XXXXXX")
    "$VENV_PIP" download --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION" >&2
    mkdir -p "$(dirname "$SDIST")"
    mv "$tmp"/llama_cpp_python-"$VERSION".tar.gz "$SDIST"
    rm -rf "$tmp"
else
    log "sdist present: $SDIST"
fi

# 2. The wheel ---------------------------------------------------------------
if [[ "${BUILD_WHEEL:-1}" == 0 ]]; then
    log "BUILD_WHEEL=0: not building the wheel"
elif compgen -G "$WHEELS/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
    log "wheel present in $WHEELS"
else
    log "building the llama-cpp-python wheel (about 200 s on 2 idle cores)"
    mkdir -p "$WHEELS"
    tmp=$(mktemp -d "$CACHE_DIR/.wheel-XXXXXX")
    CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
        "$VENV_PIP" wheel --no-deps -w "$tmp" "$SDIST" >&2
    mv "$tmp"/llama_cpp_python-"$VERSION"-*.whl "$WHEELS"/
    rm -rf "$tmp"
fi

# 3. The tools, from the same sources ---------------------------------------
if [[ -x "$TOOLS_DIR/bin/llama-quantize" && -f "$TOOLS_DIR/VERSION" ]]; then
    log "tools present in $TOOLS_DIR/bin"
    exit 0
fi
if [[ ! -d "$SRC" ]]; then
    log "extracting $SDIST"
    mkdir -p "$CACHE_DIR/src"
    tmp=$(mktemp -d "$CACHE_DIR/src/.extract-XXXXXX")
    tar -xzf "$SDIST" -C "$tmp"
    mv "$tmp/llama_cpp_python-$VERSION" "$SRC"
    rm -rf "$tmp"
fi
# The sdist has no .git, so llama.cpp's build info would say "unknown": take the
# vendored commit from the binding's changelog ("update llama.cpp to ...@<commit>").
COMMIT=$(awk -v v="## [$VERSION]" '$0==v{f=1;next} f&&/^## /{exit} f' "$SRC/CHANGELOG.md" \
    | grep -o 'llama.cpp@[0-9a-f]*' | head -1 | cut -d@ -f2 || true)
COMMIT=${COMMIT:-unknown}

BUILD="$CACHE_DIR/.build-llama.cpp-$VERSION"
log "building ${TOOLS[*]} (llama.cpp $COMMIT) with -j$JOBS"
start=$(date +%s)
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_COMMIT="$COMMIT" \
    -Wno-dev >&2
cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TOOLS[@]}" >&2

tmp=$(mktemp -d "$CACHE_DIR/.tools-XXXXXX")
mkdir -p "$tmp/bin"
for t in "${TOOLS[@]}"; do
    cp "$BUILD/bin/$t" "$tmp/bin/$t"
done
printf 'llama-cpp-python %s\nllama.cpp %s\n' "$VERSION" "$COMMIT" >"$tmp/VERSION"
rm -rf "$TOOLS_DIR"
mv "$tmp" "$TOOLS_DIR"
rm -rf "$BUILD"
log "tools built in $(( $(date +%s) - start )) s -> $TOOLS_DIR/bin"
