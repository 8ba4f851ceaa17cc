#!/usr/bin/env bash
# On the device machine, after scripts/gpu_check.sh succeeded in the same run (it builds the CUDA
# libllama in .gpu/build and writes the synthetic 1B model): the figures docs/PERFORMANCE.md asks of
# a GPU. Capture overhead with flash attention on and off (decode as generation captures it), the
# stream benchmark beside the plain llama.cpp baseline on synthetic 1B and 7B llamas in Q4_0 (the
# 7B: inf-mllm vs h2o at budget 1024 over a long stream, first vs last tenth, GPU memory), and the
# quantized KV caches. Everything printed also goes to $OUT/gpu_figures.log.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_figures.log") 2>&1
export PYTHONPATH=/tmp/site:$PWD/.gpu:$PWD PYTHONUNBUFFERED=1 INFMLLM_GGUF_HOME=/tmp/infmllm
export LLAMA_CPP_LIB_PATH=$PWD/.gpu/build/bin
bench() { python3 -m infmllm_gguf.cli.main bench -ngl -1 "$@"; }

SECONDS=0
for fa in --flash-attn --no-flash-attn; do
    timeout 150 bench --synthetic llama-1b --synthetic-dtype q4_0 --only capture $fa --prompt-tokens 2048 \
        --chunk 512 --decode-tokens 512 --repeats 3 --json "$OUT/capture_1b_${fa#--}.json"
done
timeout 200 bench --synthetic llama-1b --synthetic-dtype q4_0 --only stream --policy inf-mllm,h2o,streaming-llm \
    --budget 1024 --tokens 30720 --chunk 512 --segment 1024 --repeats 2 \
    --json "$OUT/stream_1b.json" --plot "$OUT/stream_1b.png"
timeout 240 bench --synthetic llama-7b --synthetic-dtype q4_0 --only stream --policy inf-mllm,h2o \
    --budget 1024 --tokens 51200 --chunk 512 --segment 2048 --repeats 1 \
    --json "$OUT/stream_7b.json" --plot "$OUT/stream_7b.png"
timeout 100 bench --synthetic llama-1b --synthetic-dtype q4_0 --only stream --policy inf-mllm --budget 1024 \
    --tokens 10240 --chunk 512 --segment 1024 --repeats 1 --flash-attn -ctk q8_0 -ctv q8_0 \
    --json "$OUT/stream_1b_q8_0.json"
echo "== total ${SECONDS}s"
