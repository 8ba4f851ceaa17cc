#!/usr/bin/env bash
# The long perplexity runs behind docs/RESULTS.md: about 12 hours on a 2-core CPU.
# Every run saves itself into ~/.cache/infmllm-gguf/runs every 20,000 tokens: stop the script
# whenever, rerun it, and each run resumes where it stopped. Results: docs/results/NAME.json and
# NAME.png, written when a command has finished all its runs (NAME.partial.json until then); a
# command whose results exist is skipped. Needs `make data`.
set -euo pipefail
cd "$(dirname "$0")/.."
cli=.venv/bin/infmllm-gguf
data=~/.cache/infmllm-gguf/data
runs=~/.cache/infmllm-gguf/runs
mkdir -p docs/results

stream() {  # stream NAME TEXT ARGS...: one resumable perplexity command
    local name=$1 text=$2 out=docs/results/$1
    shift 2
    [ -f "$out.json" ] && return
    $cli perplexity -f "$data/$text.txt" --segment 1024 --checkpoint-every 20000 \
        --checkpoint-dir "$runs/$name" --json "$out.partial.json" --plot "$out.png" "$@"
    mv "$out.partial.json" "$out.json"
}

# Runs (a) and (b) were made before inf-mllm had its age limit: their records hold the rule they
# ran (sinks 0, max_age 0, one decision for all layers); to redo one as recorded, pass
# --sinks 0 --max-age 0 --granularity token.
# (b) one stream of 1M tokens at budget 1024
stream shakespeare-1m shakespeare -p inf-mllm -b 1024 -n 1000000

# (a) policies x budgets on 205,056 tokens of each text (200 segments after the first). The 1M
# run above already holds inf-mllm at 1024 on Shakespeare: its curve up to 205,055 tokens.
n=205056
stream kjv-205k kjv -p streaming-llm,inf-mllm,context-shift,h2o -b 1024 -n $n
stream shakespeare-205k shakespeare -p streaming-llm,context-shift,h2o -b 1024 -n $n
stream kjv-205k-small kjv -p streaming-llm,inf-mllm -b 256,512 -n $n
stream shakespeare-205k-small shakespeare -p streaming-llm,inf-mllm -b 256,512 -n $n

# (c) the rule with its age limit (docs/RESULTS.md, "The drift and its fix"), one decision for
# all layers; one command per budget, so that each result lands as soon as it is done
stream shakespeare-205k-agelimit shakespeare -p inf-mllm -b 512 --granularity token -n $n
stream kjv-205k-agelimit kjv -p inf-mllm -b 512 --granularity token -n $n
stream shakespeare-205k-agelimit-256 shakespeare -p inf-mllm -b 256 --granularity token -n $n
stream kjv-205k-agelimit-256 kjv -p inf-mllm -b 256 --granularity token -n $n

# (d) a second architecture, Gemma 3 270M (base, sliding-window layers), on 50,176 tokens; its
# model: `python -m infmllm_gguf.model_files fetch gemma3-270m`
stream gemma3-shakespeare-50k shakespeare ~/.cache/infmllm-gguf/models/gemma-3-270m-q4_k_m.gguf \
    -p streaming-llm,inf-mllm -b 512 -n 50176

# (c, continued) budget 1024
stream shakespeare-205k-agelimit-1024 shakespeare -p inf-mllm -b 1024 --granularity token -n $n

# (e) per-layer eviction (inf-mllm --granularity layer: the default since), budgets 512, 256, 1024
stream shakespeare-205k-layer shakespeare -p inf-mllm -b 512 --granularity layer -n $n
stream kjv-205k-layer kjv -p inf-mllm -b 512 --granularity layer -n $n
stream shakespeare-205k-layer-256 shakespeare -p inf-mllm -b 256 --granularity layer -n $n
stream kjv-205k-layer-256 kjv -p inf-mllm -b 256 --granularity layer -n $n
stream shakespeare-205k-layer-1024 shakespeare -p inf-mllm -b 1024 --granularity layer -n $n
stream kjv-205k-layer-1024 kjv -p inf-mllm -b 1024 --granularity layer -n $n

# (c, last) the token rule at 1024 on the Bible
stream kjv-205k-agelimit-1024 kjv -p inf-mllm -b 1024 --granularity token -n $n
