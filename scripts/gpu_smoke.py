"""Smallest end-to-end check of a fresh build: load a model, decode, capture (used by gpu_check.sh)."""
import sys

from infmllm_gguf.runtime import Runtime

for ngl in (0, -1):
    with Runtime(sys.argv[1], n_ctx=256, n_gpu_layers=ngl) as rt:
        rt.capture_scores(4)
        rt.decode(list(range(10, 42)), range(32))
        s = rt.read_scores()
        print(f"smoke ngl={ngl}: {s.scores.shape} sums {s.scores.sum(axis=1)[:3]}", flush=True)
