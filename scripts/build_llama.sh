#!/usr/bin/env bash
# Build llama-cpp-python from its checked source distribution with patches/*.patch applied to the
# vendored llama.cpp, and install it into the virtual environment, with llama.cpp's RPC backend and
# its `rpc-server` tool (layers on other machines). The wheel and the tool are cached under a key
# made of the sdist checksum, the patches' content and the build flags: a second run takes seconds.
#
#   CUDA=1            build with -DGGML_CUDA=on
#   CUDA_ARCH=90      ... for this GPU architecture only (a much shorter build)
#   PYTHON=...        the interpreter of the virtual environment (default .venv/bin/python)
#   INFMLLM_GGUF_HOME cache directory (default ~/.cache/infmllm-gguf)
set -euo pipefail

VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CACHE=${INFMLLM_GGUF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/infmllm-gguf}
CUDA=${CUDA:-0}
CUDA_ARCH=${CUDA_ARCH:-}

cmake_args="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_RPC=ON"
if [ "$(uname -m)" = x86_64 ]; then
    # No AMX kernels: on an AMX Xeon (Sapphire Rapids) -march=native turns them on, and their
    # mul_mat segfaulted on the first batch (seen on this project's CPU machine; upstream
    # ggml-org/llama.cpp#20824, closed without a fix). GCC keeps an explicit -mno-* over -march.
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake_args+=" -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
fi
if [ "$CUDA" = 1 ]; then
    # --exclude-libs: with CUDA 13, libggml-cuda.so re-exported libstdc++ internals from a static
    # archive, and libllama bound to them and crashed in llama_model::print_info (seen on an H200)
    cmake_args+=" -DGGML_CUDA=on -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"
    [ -n "$CUDA_ARCH" ] && cmake_args+=" -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH"
fi

# -march=native builds for this CPU: its flags are part of the key, so a cache shared between
# machines never hands one a wheel with instructions it lacks
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)
key=$({ echo "$SDIST_SHA256 $cmake_args $cpu_flags"; cat patches/*.patch; } | sha256sum | cut -c1-16)
wheel_dir="$CACHE/wheels/$key"

if ! compgen -G "$wheel_dir/*.whl" > /dev/null; then
    sdist="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
    if [ ! -f "$sdist" ]; then
        echo "== downloading the llama-cpp-python $VERSION source distribution"
        mkdir -p "$CACHE/sdist"
        "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
            "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
    fi
    echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet - || {
        echo "error: $sdist does not have the pinned sha256; delete it and rerun" >&2; exit 1; }

    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    tar -xzf "$sdist" -C "$work"
    src="$work/llama_cpp_python-$VERSION"
    for p in patches/*.patch; do
        echo "== applying $p"
        patch -p1 --forward --batch --quiet -d "$src/vendor/llama.cpp" < "$p" || {
            echo "error: $p does not apply to llama-cpp-python $VERSION" >&2; exit 1; }
    done

    echo "== building the patched wheel ($cmake_args); about 7 minutes on 2 cores"
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PY" -m pip wheel -q --no-deps --no-build-isolation "$src" -w "$work/dist"
    # rpc-server: one source file over the wheel's ggml libraries, found next to it at run time
    echo "== building rpc-server"
    mkdir -p "$work/whl" && "$PY" -m zipfile -e "$work"/dist/*.whl "$work/whl"
    ggml="$src/vendor/llama.cpp/ggml"
    ${CXX:-g++} -O2 -std=c++17 -I"$ggml/include" "$src/vendor/llama.cpp/tools/rpc/rpc-server.cpp" \
        -o "$work/dist/rpc-server" -L"$work/whl/llama_cpp/lib" -lggml -lggml-base -Wl,-rpath,'$ORIGIN/../lib'
    mkdir -p "$wheel_dir"
    mv "$work"/dist/*.whl "$work/dist/rpc-server" "$wheel_dir/"
fi

"$PY" -m pip install -q --no-deps --force-reinstall "$wheel_dir"/*.whl
# the tool lies beside the package's libraries ($ORIGIN/../lib); the venv's bin links to it
pkg=$("$PY" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("llama_cpp").origin))')
install -D -m 755 "$wheel_dir/rpc-server" "$pkg/bin/rpc-server"
ln -sf "$pkg/bin/rpc-server" "$(dirname "$PY")/rpc-server"
echo "== patched llama-cpp-python $VERSION installed, with rpc-server (wheel cache key $key)"
