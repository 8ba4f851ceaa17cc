"""Perplexity of the policies x budgets on the first N tokens of Shakespeare (issue 3's table).

    .venv/bin/python scripts/perplexity_table.py --tokens 20480 --budgets 256,512,1024 \
        --policies inf-mllm,streaming-llm,h2o,window --threads 1 --json out/table.json
"""
import argparse
import json
from dataclasses import asdict

from infmllm_gguf.data import shakespeare_path
from infmllm_gguf.perplexity import stream_perplexity
from infmllm_gguf.runtime import Runtime

parser = argparse.ArgumentParser()
parser.add_argument("--tokens", type=int, default=20480)
parser.add_argument("--budgets", default="256,512,1024")
parser.add_argument("--policies", default="inf-mllm,streaming-llm,h2o,window")
parser.add_argument("--chunk", type=int, default=256)
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--full-tokens", type=int, default=8192, help="tokens for the full-cache floor (0: skip)")
parser.add_argument("--json", default=None)
args = parser.parse_args()

with Runtime(n_ctx=256) as rt:
    tokens = rt.tokenize(shakespeare_path().read_text(encoding="utf-8")[: args.tokens * 8])[: args.tokens]
print(f"{len(tokens)} tokens of Shakespeare, chunk {args.chunk}", flush=True)
runs = []
if args.full_tokens:
    r = stream_perplexity(tokens[: args.full_tokens], policy="full", budget=args.full_tokens, chunk=args.chunk,
                          n_threads=args.threads)
    runs.append(r)
    print(f"full (first {r.tokens} tokens): ppl {r.ppl:.3f}, {r.tokens_per_s:.1f} tok/s", flush=True)
for budget in map(int, args.budgets.split(",")):
    for policy in args.policies.split(","):
        r = stream_perplexity(tokens, policy=policy, budget=budget, chunk=args.chunk, n_threads=args.threads)
        runs.append(r)
        print(f"{policy:14s} budget {budget:5d}: ppl {r.ppl:8.3f}  {r.tokens_per_s:6.1f} tok/s  "
              f"evict {r.evict_share:.3%}  capture {r.capture_share:.3%}", flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump([asdict(r) for r in runs], f, indent=1)
