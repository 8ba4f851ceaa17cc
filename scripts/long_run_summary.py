"""Figures of long `infmllm-gguf perplexity` runs for docs/RESULTS.md, read from their --json files.

    python scripts/long_run_summary.py docs/results/shakespeare-1m.json [--at 205055] [--block 100000]
        [--plot OUT.png]

Per run: speed over the first and the last 10% of the stream (wall clock, and tokens per CPU
second, which a busy machine does not skew), resident memory near 10k tokens and at its peak,
perplexity per block of tokens, and the perplexity of everything up to `--at` tokens (a
segment end: 1,279 + 1,024 k with chunk 256 and segment 1024). `--plot` draws the runs of all
the files in one figure, each cut at `--at` tokens: runs of separate commands side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from infmllm_gguf.perplexity import PerplexityRun, cumulative_ppl, plot_runs


def speed(segments, sizes) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) over `segments` of `sizes` tokens."""
    return float(sizes.sum() / sum(s.seconds for s in segments)), float(sizes.sum() / sum(s.cpu_s for s in segments))


def summary(run: PerplexityRun, at: int | None, block: int) -> str:
    curve = run.curve
    sizes = np.diff([0] + [s.tokens for s in curve])
    tenth = max(1, len(curve) // 10)
    first, last = speed(curve[:tenth], sizes[:tenth]), speed(curve[-tenth:], sizes[-tenth:])
    near_10k = min(curve, key=lambda s: abs(s.tokens - 10_000))
    lines = [f"{run.label()}: {run.tokens:,} tokens, ppl {run.ppl:.3f}, {run.seconds / 3600:.2f} h, "
             f"{run.tokens_per_s:.1f} tok/s, peak cells {run.peak_cells}",
             f"  tok/s first 10% {first[0]:.1f} (per CPU s {first[1]:.1f}), last 10% {last[0]:.1f} "
             f"(per CPU s {last[1]:.1f}): last/first {last[0] / first[0]:.3f} wall, {last[1] / first[1]:.3f} CPU",
             f"  RSS at {near_10k.tokens:,} tokens {near_10k.rss_mib:.1f} MiB, at the end {curve[-1].rss_mib:.1f}, "
             f"peak {max(s.rss_mib for s in curve):.1f} ({max(s.rss_mib for s in curve) / near_10k.rss_mib - 1:+.2%})"]
    if at is not None:
        early = cut(run, at)
        lines.append(f"  ppl up to {at:,} tokens: " + (f"{early.ppl:.3f}" if early else "not a segment end"))
    blocks = []
    for lo in range(0, run.tokens, block):
        sel = [i for i, s in enumerate(curve) if lo < s.tokens <= lo + block]
        if sel:
            nll = np.sum(sizes[sel] * np.log([curve[i].ppl for i in sel])) / sizes[sel].sum()
            blocks.append(f"{lo // 1000}-{min(lo + block, run.tokens) // 1000}k {np.exp(nll):.2f}")
    lines.append("  ppl per block: " + ", ".join(blocks))
    return "\n".join(lines)


def cut(run: PerplexityRun, at: int) -> PerplexityRun | None:
    """The run as if it had stopped after `at` tokens; None unless that is a segment end of it."""
    ends, cum = cumulative_ppl(run)
    hit = np.flatnonzero(ends == at)
    if not hit.size:
        return None
    return dataclasses.replace(run, tokens=at, ppl=float(cum[hit[0]]), curve=run.curve[:hit[0] + 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+")
    parser.add_argument("--at", type=int, help="also the perplexity up to this many tokens")
    parser.add_argument("--block", type=int, default=100_000, help="tokens per block of the perplexity listing")
    parser.add_argument("--plot", help="one figure of all the runs, cut at --at tokens")
    args = parser.parse_args()
    records = [record for path in args.json for record in json.load(open(path))]
    runs = [PerplexityRun.from_json(record) for record in records]
    for run in runs:
        print(summary(run, args.at, args.block))
    if args.plot:
        texts = ", ".join(sorted({Path(r["file"]).name for r in records}))
        shown = [cut(r, args.at) for r in runs] if args.at else runs
        if None in shown:
            raise SystemExit(f"error: {args.at:,} tokens is not a segment end of every run")
        plot_runs(shown, args.plot, title=texts)


if __name__ == "__main__":
    main()
