#!/usr/bin/env bash
# On the device machine (one CUDA GPU, no network), from the repository root, after
# scripts/prepare_gpu_tree.sh made .gpu/ here: builds the patched libllama with CUDA from .gpu/,
# runs the GPU tests on synthetic random-weight models, the capture-overhead benchmark and the
# streaming benchmark (speed, eviction time, RSS and GPU memory over stream length per policy).
# Everything printed also goes to $OUT/gpu_check.log.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

ARCH=${CUDA_ARCH:-90}
export PATH=/usr/local/cuda/bin:$PATH
BUILD=.gpu/build
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu:$PWD PYTHONUNBUFFERED=1
export INFMLLM_GGUF_HOME=/tmp/infmllm  # `bench --synthetic SHAPE` keeps its models in $INFMLLM_GGUF_HOME/synthetic
python3 -c "import pynvml" || echo "warning: no nvidia-ml-py: the stream benchmark cannot read GPU memory"

SECONDS=0
cmake -S .gpu/llama.cpp -B $BUILD -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF \
    "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" > "$OUT/cmake.log" 2>&1 \
    || { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build $BUILD -j "$(nproc)" --target llama > "$OUT/build.log" 2>&1 || { grep -B2 -A8 error "$OUT/build.log" | head -60; exit 1; }
echo "== CUDA build of libllama: ${SECONDS}s"
export LLAMA_CPP_LIB_PATH=$PWD/$BUILD/bin

python3 -m infmllm_gguf.synthetic /tmp/tiny.gguf --shape tiny-llama --dtype f16
if ! INFMLLM_GGUF_VERBOSE=1 python3 -X faulthandler scripts/gpu_smoke.py /tmp/tiny.gguf > "$OUT/smoke.log" 2>&1; then
    tail -40 "$OUT/smoke.log"
    ldd $BUILD/bin/libllama.so | head -20
    CUDA_VISIBLE_DEVICES= python3 -X faulthandler scripts/gpu_smoke.py /tmp/tiny.gguf 2>&1 | tail -5
    timeout 120 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 scripts/gpu_smoke.py /tmp/tiny.gguf 2>&1 | tail -80
    exit 1
fi
tail -3 "$OUT/smoke.log"
LLAMA_1B=$INFMLLM_GGUF_HOME/synthetic/llama-1b-q8_0.gguf  # where `bench --synthetic llama-1b` finds it
python3 -m infmllm_gguf.synthetic $LLAMA_1B --shape llama-1b --dtype q8_0
INFMLLM_GPU_MODEL=$LLAMA_1B timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py
for fa in --flash-attn --no-flash-attn; do
    timeout 120 python3 -m infmllm_gguf.cli.main bench $LLAMA_1B --only capture -ngl -1 $fa --prompt-tokens 1024 --chunk 512 \
        --decode-tokens 64 --repeats 3 --json "$OUT/bench_1b${fa#--}.json"
done
timeout 240 python3 -m infmllm_gguf.cli.main bench --synthetic llama-1b --only stream -ngl -1 --policy inf-mllm,h2o,streaming-llm,full \
    --budget 1024 --tokens 30000 --chunk 512 --segment 1024 --repeats 2 \
    --json "$OUT/stream_1b.json" --plot "$OUT/stream_1b.png"
echo "== total ${SECONDS}s"
