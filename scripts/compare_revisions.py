"""The benchmark's figures of this tree and of an earlier revision, side by side in one process.

    .venv/bin/python scripts/compare_revisions.py 81517e8 [--rounds 3] [--tokens 4096]

The revision's package is exported (`git archive`) into a temporary folder as `infmllm_gguf_before`
(its imports are relative, so it runs as it was) and imported beside this tree's `infmllm_gguf`;
both drive the same llama.cpp build. Each round runs the stream benchmark (inf-mllm, h2o,
streaming-llm at budget 512, the plain llama.cpp baseline), the capture overhead and the memory's
cost, before then after, so that drift of the machine hits both alike. Prints each figure's median
over the rounds, before and after, and their ratio.
"""
from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def export(rev: str, into: Path) -> None:
    """The package at `rev` as `into/infmllm_gguf_before`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "infmllm_gguf"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "infmllm_gguf").rename(into / "infmllm_gguf_before")


def measure(pkg: str, model: str, tokens: int, threads: int) -> dict[str, float]:
    """One round of one package's figures: {figure name: value}."""
    policies = importlib.import_module(f"{pkg}.policies")
    stream = importlib.import_module(f"{pkg}.bench.stream")
    capture = importlib.import_module(f"{pkg}.bench.capture")
    memory = importlib.import_module(f"{pkg}.bench.memory")
    figures = importlib.import_module(f"{pkg}.bench.figures")
    grid = [policies.make_policy(name, budget=512) for name in ("inf-mllm", "h2o", "streaming-llm")]
    s = stream.stream_bench(model, policies=grid, tokens=tokens, repeats=1, n_threads=threads)
    c = capture.capture_overhead(model, repeats=2, n_threads=threads)
    m = memory.memory_cost(model, budget=512, tokens=tokens // 2, memory_tokens=20_000, questions=3, repeats=1,
                           n_threads=threads)
    out = {f"tokens/s, {x.policy['name']}": x.tokens_per_s.median for x in s.summaries()}
    out.update({f"{f['figure']}{', ' + f['run'] if f['run'] else ''}": f["value"]
                for f in figures.figures(c, s, m)})
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev")
    parser.add_argument("--model", default=None, help="a GGUF (default: the default model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        export(args.rev, Path(tmp))
        sys.path.insert(0, tmp)
        from infmllm_gguf.model_files import default_model_path

        model = args.model or str(default_model_path())
        rounds: dict[str, list[dict[str, float]]] = {"infmllm_gguf_before": [], "infmllm_gguf": []}
        for r in range(args.rounds):
            for pkg in rounds:
                print(f"round {r + 1}/{args.rounds}: {pkg}", file=sys.stderr)
                rounds[pkg].append(measure(pkg, model, args.tokens, args.threads))
    before, after = ({k: float(np.median([x[k] for x in runs if k in x])) for k in runs[0]}
                     for runs in rounds.values())
    print(f"{'figure (median of ' + str(args.rounds) + ' rounds)':80s} {args.rev:>10s} {'HEAD':>10s} {'ratio':>7s}")
    for key in before:
        if key in after:
            ratio = f"{after[key] / before[key]:7.3f}" if before[key] else "      -"
            print(f"{key[:80]:80s} {before[key]:10.4g} {after[key]:10.4g} {ratio}")


if __name__ == "__main__":
    main(sys.argv[1:])
