#!/usr/bin/env bash
# Builds llama.cpp's reference tools (llama-perplexity, llama-quantize, llama-imatrix,
# llama-gguf, llama-tokenize, llama-gguf-split) so the project can check its numbers against llama.cpp.
#
# Time: about 15 minutes on 2 cores (-j2, nice 19, CPU-only AVX2 build) plus
# ~15 s to download the 77 MB source from PyPI; nothing to do on later runs.
#
# Source: the llama.cpp tree vendored in the PyPI sdist of llama-cpp-python (only
# package registries are reachable here, not GitHub). llama-cpp-python 0.3.36
# vendors ggml-org/llama.cpp@0c1e57098.
#
# Location: ${LLAMA_CPP_DIR:-.cache/llama.cpp}, relative to the repository root;
# binaries end up in $LLAMA_CPP_DIR/bin. Idempotent: if every binary is there it
# does nothing and needs no network. Needs python3 + pip (PyPI), cmake, a C/C++
# compiler otherwise.
#
# Environment: LLAMA_CPP_JOBS (default 2) parallel compile jobs.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_COMMIT=0c1e57098
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
TARGETS=(llama-perplexity llama-quantize llama-imatrix llama-gguf llama-tokenize llama-gguf-split)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dir="${LLAMA_CPP_DIR:-.cache/llama.cpp}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
bin="$dir/bin"

have_all() {
    local t
    for t in "${TARGETS[@]}"; do
        [ -x "$bin/$t" ] || return 1
    done
}

if have_all; then
    echo "build-llama-cpp: llama.cpp@$LLAMA_CPP_COMMIT tools ready in $bin"
    exit 0
fi

command -v cmake >/dev/null 2>&1 || {
    echo "build-llama-cpp: cmake not found (install it, e.g. apt-get install -y cmake)" >&2
    exit 1
}
command -v c++ >/dev/null 2>&1 || {
    echo "build-llama-cpp: no C++ compiler found (install build-essential)" >&2
    exit 1
}

src_parent="$dir/src"
tarball="$src_parent/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
src="$src_parent/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
mkdir -p "$src_parent"

if [ ! -f "$src/CMakeLists.txt" ]; then
    if [ ! -f "$tarball" ]; then
        # --no-binary for this package only: build dependencies (cmake, ...) used by
        # pip to read the sdist's metadata come as wheels, not built from source.
        if ! python3 -m pip download --quiet --no-deps \
                --no-binary llama-cpp-python \
                "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$src_parent" >&2; then
            echo "build-llama-cpp: could not download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from PyPI" >&2
            exit 1
        fi
    fi
    got="$(sha256sum "$tarball" | cut -d' ' -f1)"
    if [ "$got" != "$SDIST_SHA256" ]; then
        echo "build-llama-cpp: sha256 mismatch for $tarball ($got)" >&2
        exit 1
    fi
    tar -xzf "$tarball" -C "$src_parent"
fi

build="$dir/build"
# CPU backend: a fixed AVX2/FMA/F16C build (x86-64-v3), not -march=native. With
# GGML_NATIVE=ON on this machine (Xeon with AMX) ggml takes its AMX path for Q4_1
# matmuls and llama-perplexity segfaults in ggml_backend_amx_mul_mat; a fixed ISA
# also keeps the numbers the same from machine to machine.
# LLAMA_BUILD_COMMIT is given explicitly: the source has no .git, and git would
# otherwise report the enclosing repository's commit.
nice -n 19 cmake -S "$src" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF \
    -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DGGML_CCACHE=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_COMMIT="$LLAMA_CPP_COMMIT" \
    -DLLAMA_BUILD_NUMBER=0 >&2
nice -n 19 cmake --build "$build" -j "${LLAMA_CPP_JOBS:-2}" --target "${TARGETS[@]}" >&2

mkdir -p "$bin"
for t in "${TARGETS[@]}"; do
    cp "$build/bin/$t" "$bin/$t"
done
echo "build-llama-cpp: built llama.cpp@$LLAMA_CPP_COMMIT tools in $bin"
