#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for the device machine, which has no network: the patched llama.cpp
# trimmed to what a CUDA build of libllama needs (about 10 MB), llama-cpp-python's Python package,
# and wheels of the pure-Python packages that machine lacks. scripts/gpu_check.sh consumes it.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE=${INFMLLM_GGUF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/infmllm-gguf}
sdist="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
[ -f "$sdist" ] || { echo "error: run make setup first (no $sdist)" >&2; exit 1; }

rm -rf .gpu && mkdir -p .gpu/whl
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$VERSION"
for p in patches/*.patch; do patch -p1 --forward --batch --quiet -d "$src/vendor/llama.cpp" < "$p"; done

dst=.gpu/llama.cpp
mkdir -p "$dst/ggml/src"
cp -r "$src"/vendor/llama.cpp/{CMakeLists.txt,cmake,include,src,vendor} "$dst"/
cp -r "$src"/vendor/llama.cpp/ggml/{CMakeLists.txt,cmake,include} "$dst/ggml"/
(cd "$src/vendor/llama.cpp/ggml/src" && cp -r $(ls | grep -Ev '^ggml-(vulkan|metal|sycl|opencl|cann|hexagon|webgpu|openvino|et|virtgpu|musa|hip|kompute|zdnn|rpc|blas|zendnn)$') "$OLDPWD/$dst/ggml/src"/)
# the top-level CMakeLists reads these when present; keep the configure step happy without them
mkdir -p "$dst/common" "$dst/tools" "$dst/examples" "$dst/tests" "$dst/pocs" "$dst/app"
cp "$src/vendor/llama.cpp/LICENSE" "$dst"/
cp -r "$src/llama_cpp" .gpu/llama_cpp

.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl gguf diskcache
du -sh .gpu
