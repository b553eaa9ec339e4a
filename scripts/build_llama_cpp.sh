#!/usr/bin/env bash
# Build llama.cpp for quantforge ONCE per (version, backend), into a cache folder:
#   1. the llama-cpp-python sdist (source only on PyPI), downloaded with pip, or
#      taken from $LLAMA_CPP_SDIST (an offline machine: copy the file there);
#   2. llama.cpp itself from the sdist's vendor/llama.cpp, built once with shared
#      libraries: libllama/libggml* (what the Python binding loads) and the tools
#      llama-imatrix, llama-perplexity, llama-bench, llama-quantize, all in one
#      folder whose binaries find the libraries next to them ($ORIGIN rpath);
#   3. the binding's wheel built with LLAMA_BUILD=OFF: Python code only. quantforge
#      points it at the folder of step 2 through LLAMA_CPP_LIB_PATH, the binding's
#      own override, so the binding and the tools run the very same build.
# Compiling once matters: the binding's wheel build would otherwise compile all of
# llama.cpp a second time (about 200 s more on 2 cores).
#
# Usage: scripts/build_llama_cpp.sh CACHE_DIR VENV_PIP
# Prints the tools folder on its last line of stdout.
# Env: LLAMA_CPP_PYTHON_VERSION (0.3.36); LLAMA_CPP_BUILD_JOBS (nproc);
#      LLAMA_CPP_SDIST (a local sdist file: no download);
#      QUANTFORGE_LLAMA_CPP_BACKEND = auto (default) | cpu | cuda;
#      CUDA_ARCHS (the GPU's own compute capability by default, e.g. 90).
# backend auto: CUDA when nvcc and an NVIDIA GPU are present, else CPU (said once).
# Idempotent: each output appears atomically (temp name, then rename), so an
# interrupted build is redone, never half-used.
#
# Why GGML_NATIVE=OFF: the native build picks AMX on some CPUs and every quantized
# GGUF then segfaults on its first decode (llama.cpp issue 20824). The portable
# build is what we ship and measure.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 CACHE_DIR VENV_PIP" >&2
    exit 2
fi
CACHE_DIR=$(mkdir -p "$1" && cd "$1" && pwd)
VENV_PIP=$2
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${LLAMA_CPP_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
BACKEND=${QUANTFORGE_LLAMA_CPP_BACKEND:-auto}
TOOLS=(llama-imatrix llama-perplexity llama-bench llama-quantize)

SDIST="$CACHE_DIR/sdist/llama_cpp_python-$VERSION.tar.gz"
SRC="$CACHE_DIR/src/llama_cpp_python-$VERSION"
WHEELS="$CACHE_DIR/wheels"

log() { echo "[build_llama_cpp] $*" >&2; }

# Backend -------------------------------------------------------------------
if [[ "$BACKEND" == auto ]]; then
    if command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        BACKEND=cuda
    else
        BACKEND=cpu
        log "no nvcc or no NVIDIA GPU here: building llama.cpp for the CPU"
    fi
fi
CMAKE_EXTRA=()
case "$BACKEND" in
    cpu) FLAVOUR=cpu ;;
    cuda)
        if [[ -z "${CUDA_ARCHS:-}" ]]; then
            # The GPU's own architecture (e.g. "9.0" -> 90): one arch compiles in a
            # fraction of the time of llama.cpp's default list.
            CUDA_ARCHS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
        fi
        FLAVOUR="cuda$CUDA_ARCHS"
        CMAKE_EXTRA=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS")
        log "building llama.cpp with CUDA for compute capability $CUDA_ARCHS"
        ;;
    *) echo "QUANTFORGE_LLAMA_CPP_BACKEND must be auto, cpu or cuda (got '$BACKEND')" >&2; exit 2 ;;
esac
TOOLS_DIR="$CACHE_DIR/llama.cpp-$VERSION-$FLAVOUR"

# 1. The sdist ---------------------------------------------------------------
if [[ ! -f "$SDIST" ]]; then
    mkdir -p "$(dirname "$SDIST")"
    if [[ -n "${LLAMA_CPP_SDIST:-}" ]]; then
        log "using the sdist $LLAMA_CPP_SDIST"
        cp "$LLAMA_CPP_SDIST" "$SDIST.tmp" && mv "$SDIST.tmp" "$SDIST"
    else
        log "downloading llama-cpp-python==$VERSION sdist"
        tmp=$(mktemp -d "$CACHE_DIR/.sdist-XXXXXX")
        "$VENV_PIP" download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION" >&2
        mv "$tmp"/llama_cpp_python-"$VERSION".tar.gz "$SDIST"
        rm -rf "$tmp"
    fi
fi
if [[ ! -d "$SRC" ]]; then
    log "extracting $SDIST"
    mkdir -p "$CACHE_DIR/src"
    tmp=$(mktemp -d "$CACHE_DIR/src/.extract-XXXXXX")
    tar -xzf "$SDIST" -C "$tmp"
    mv "$tmp/llama_cpp_python-$VERSION" "$SRC"
    rm -rf "$tmp"
fi

# 2. llama.cpp: shared libraries + tools, one build ---------------------------
if [[ -x "$TOOLS_DIR/bin/llama-quantize" && -f "$TOOLS_DIR/bin/libllama.so" && -f "$TOOLS_DIR/VERSION" ]]; then
    log "llama.cpp present in $TOOLS_DIR/bin"
else
    # The sdist has no .git, so llama.cpp's build info would say "unknown": take the
    # vendored commit from the binding's changelog ("update llama.cpp to ...@<commit>").
    COMMIT=$(awk -v v="## [$VERSION]" '$0==v{f=1;next} f&&/^## /{exit} f' "$SRC/CHANGELOG.md" \
        | grep -o 'llama.cpp@[0-9a-f]*' | head -1 | cut -d@ -f2 || true)
    COMMIT=${COMMIT:-unknown}
    BUILD="$CACHE_DIR/.build-llama.cpp-$VERSION-$FLAVOUR"
    GEN=()
    command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
    log "building libllama + ${TOOLS[*]} (llama.cpp $COMMIT, $FLAVOUR) with -j$JOBS"
    start=$(date +%s)
    rm -rf "$BUILD"
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${GEN[@]}" \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF \
        -DBUILD_SHARED_LIBS=ON \
        -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_HTML=OFF \
        -DLLAMA_BUILD_COMMIT="$COMMIT" \
        "${CMAKE_EXTRA[@]}" \
        -Wno-dev >&2
    cmake --build "$BUILD" --config Release -j "$JOBS" --target llama "${TOOLS[@]}" >&2

    tmp=$(mktemp -d "$CACHE_DIR/.tools-XXXXXX")
    mkdir -p "$tmp/bin"
    for t in "${TOOLS[@]}"; do
        cp "$BUILD/bin/$t" "$tmp/bin/$t"
    done
    # Every shared library of the build (libllama, libggml, libggml-base, libggml-cpu,
    # libggml-cuda, libllama-common, ...), wherever CMake put it; -P keeps the soname
    # links as links (one copy of each library).
    find "$BUILD" -name 'lib*.so*' -exec cp -P {} "$tmp/bin/" \;
    printf 'llama-cpp-python %s\nllama.cpp %s\nbackend %s\n' "$VERSION" "$COMMIT" "$FLAVOUR" >"$tmp/VERSION"
    rm -rf "$TOOLS_DIR"
    mv "$tmp" "$TOOLS_DIR"
    rm -rf "$BUILD"
    log "llama.cpp built in $(( $(date +%s) - start )) s -> $TOOLS_DIR/bin"
fi

# 3. The binding: Python only, loads the libraries of step 2 -------------------
if compgen -G "$WHEELS/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
    log "binding wheel present in $WHEELS"
else
    log "building the llama-cpp-python wheel without its own llama.cpp (LLAMA_BUILD=OFF)"
    mkdir -p "$WHEELS"
    tmp=$(mktemp -d "$CACHE_DIR/.wheel-XXXXXX")
    # An offline machine: install scikit-build-core into the venv first (from a
    # wheel) and the build runs without fetching its build backend.
    ISOLATION=()
    "$(dirname "$VENV_PIP")/python" -c "import scikit_build_core" 2>/dev/null && ISOLATION=(--no-build-isolation)
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        "$VENV_PIP" wheel -q --no-deps "${ISOLATION[@]}" -w "$tmp" "$SDIST" >&2
    mv "$tmp"/llama_cpp_python-"$VERSION"-*.whl "$WHEELS"/
    rm -rf "$tmp"
fi
echo "$TOOLS_DIR/bin"
