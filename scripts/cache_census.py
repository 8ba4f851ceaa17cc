"""What a bounded cache holds over a long stream: the census behind docs/RESULTS.md's drift figures.

    python scripts/cache_census.py --file ~/.cache/infmllm-gguf/data/shakespeare.txt --tokens 205056 \\
        --policy inf-mllm --budget 512 [--every 4096] [--json OUT.json] [policy options, e.g. --bias 1]
    python scripts/cache_census.py --plot OUT.png A.json ... [--curves docs/results/X.json ...]

Streams the text through one `StreamSession`, scoring every token (as `perplexity` does), and
every `--every` tokens takes a census of the cached cells: the share of the budget held by cells
older than 1, 4 and 16 budgets, the sinks still cached, and the commonest tokens among the cells
older than one budget. At each eviction it notes the age of every evicted cell, which gives how
long a cell survives once it is out of the recent window. With per-layer eviction (the default
where the cache allows it) every layer's cells are counted: shares are of all layers' budgets.
`--plot` draws, for each census, the
old cells' share against stream position, and, from perplexity records (`--curves`), each run's
perplexity per block of tokens against streaming-llm's at the same budget.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infmllm_gguf import StreamSession  # noqa: E402
from infmllm_gguf.extras import pyplot  # noqa: E402
from infmllm_gguf.perplexity import file_tokens, slice_tokens  # noqa: E402
from infmllm_gguf.policies import declared_options, from_config  # noqa: E402

AGES = (1, 4, 16)  # in budgets
SURVIVAL = (1, 2, 4, 8, 16, 32, 64)  # ages, in budgets, at which the survivors are counted


def census(session: StreamSession, token_ids: np.ndarray, top: int) -> dict:
    """What the cache holds now; with per-layer eviction, all layers' cells pooled (shares of
    n_layer budgets, token counts over all layers)."""
    budget, seen = session.policy.budget, session.stats.tokens_seen
    indices = session.cache.cells.held_by_layer
    ages = seen - indices
    old = indices[ages > budget]
    texts = collections.Counter(session.model.token_bytes(int(t)).decode("utf-8", errors="backslashreplace")
                                for t in token_ids[old])
    return {"tokens": int(seen), "cells": int(indices.shape[1]),
            "share_older": {str(k): float(np.count_nonzero(ages > k * budget) / (budget * len(indices)))
                            for k in AGES},
            "first_tokens_cached": int(np.count_nonzero(indices[0] < 4)),
            "old_cells": int(old.size), "old_tokens": texts.most_common(top)}


def run(args: argparse.Namespace, options: dict) -> dict:
    with StreamSession(args.model, args.policy, chunk=args.chunk, n_threads=args.threads, **options) as s:
        token_ids = np.concatenate([np.asarray(b, dtype=np.int64) for b in
                                    slice_tokens(file_tokens(s.model, args.file), 0, args.tokens)])
        budget = s.policy.budget
        evicted_ages: list[np.ndarray] = []
        snapshots, curve, nll_sum, seg_nll, seg_n = [], [], 0.0, 0.0, 0
        for i in range(0, token_ids.size, args.chunk):
            new = np.arange(i, min(i + args.chunk, token_ids.size))
            before = [np.concatenate((row, new)) for row in s.cache.cells.held_by_layer]
            nll = s.token_nll(token_ids[i:i + args.chunk])
            for row_before, row in zip(before, s.cache.cells.held_by_layer):  # ages at eviction, in each layer
                evicted_ages.append(s.stats.tokens_seen - np.setdiff1d(row_before, row, assume_unique=True))
            nll_sum += float(nll.sum())
            seg_nll, seg_n = seg_nll + float(nll.sum()), seg_n + nll.size
            done = s.stats.tokens_seen
            if done % args.every == 0 or done == token_ids.size:
                snapshots.append(census(s, token_ids, args.top))
                curve.append({"tokens": done, "ppl": float(np.exp(seg_nll / seg_n))})
                seg_nll, seg_n = 0.0, 0
                print(f"{done:8d} tokens: ppl so far {np.exp(nll_sum / (done - 1)):.3f}, older than 1/4/16 budgets "
                      f"{', '.join(f'{v:.1%}' for v in snapshots[-1]['share_older'].values())}", file=sys.stderr)
        lived = np.concatenate(evicted_ages)
        return {"file": str(args.file), "policy": s.policy.config(), "chunk": args.chunk, "tokens": int(token_ids.size),
                "ppl": float(np.exp(nll_sum / (token_ids.size - 1))), "every": args.every, "snapshots": snapshots,
                "curve": curve, "evicted": int(lived.size),
                "survival": {str(k): float(np.count_nonzero(lived > k * budget) / max(lived.size, 1))
                             for k in SURVIVAL}}


def ppl_blocks(run: dict, block: int) -> dict[int, float]:
    """Perplexity of each `block` tokens of a perplexity record's curve (segments grouped), by block end."""
    out, nll, n, prev = {}, 0.0, 0, 0
    for seg in run["curve"]:
        size = seg["tokens"] - prev
        prev = seg["tokens"]
        nll, n = nll + size * np.log(seg["ppl"]), n + size
        if n >= block:
            out[seg["tokens"]] = float(np.exp(nll / n))
            nll, n = 0.0, 0
    return out


def plot(paths: list[str], out: str, curves: list[str], block: int) -> None:
    """Top: the old cells' share in each census. Bottom: from perplexity records (`curves`), each
    policy's perplexity per block minus streaming-llm's at the same budget."""
    plt = pyplot("the census plot")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for r in (json.loads(Path(p).read_text()) for p in paths):
        label = f"{from_config(r['policy']).label()} ({Path(r['file']).stem})"
        x = [c["tokens"] for c in r["snapshots"]]
        for k, style in zip(AGES, ("-", "--", ":")):
            top.plot(x, [c["share_older"][str(k)] for c in r["snapshots"]], style,
                     label=f"{label}: older than {k} budget{'s' if k > 1 else ''}")
    records = [rec for path in curves for rec in json.loads(Path(path).read_text())]
    for rec in records:
        base = next((b for b in records if b["policy"]["name"] == "streaming-llm"
                     and b["policy"]["budget"] == rec["policy"]["budget"] and b["file"] == rec["file"]), None)
        if base is None or rec is base:
            continue
        mine, theirs = ppl_blocks(rec, block), ppl_blocks(base, block)
        pts = sorted((t, 100 * (mine[t] / theirs[t] - 1)) for t in mine if t in theirs)
        bottom.plot(*zip(*pts), label=f"{from_config(rec['policy']).label()} ({Path(rec['file']).stem})")
    top.set_ylabel("share of the budget")
    top.set_title("cells kept past the recent window, by age", fontsize=10)
    top.legend(fontsize=7)
    bottom.axhline(0, color="k", lw=0.5)
    bottom.set_ylabel(f"perplexity per {block:,} tokens\nvs streaming-llm, same budget (%)")
    bottom.set_xlabel("tokens streamed")
    bottom.legend(fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", type=Path)
    p.add_argument("--model")
    p.add_argument("--policy", default="inf-mllm")
    p.add_argument("--tokens", type=int, default=205_056)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--every", type=int, default=4096, help="tokens between censuses (a multiple of the chunk)")
    p.add_argument("--top", type=int, default=12, help="commonest old tokens listed per census")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path, help="write the census here")
    p.add_argument("--plot", help="draw the censuses named as positional arguments into this PNG")
    p.add_argument("censuses", nargs="*", help="with --plot: census JSON files")
    p.add_argument("--curves", nargs="*", default=[], help="with --plot: perplexity JSON records to compare with "
                                                            "streaming-llm per block")
    p.add_argument("--block", type=int, default=10_000, help="with --plot: tokens per block of the comparison")
    declared = declared_options()
    for d in declared.values():
        p.add_argument("--" + d.name.replace("_", "-"), dest=d.name, type=d.type, help=d.describe())
    args = p.parse_args()
    if args.plot:
        plot(args.censuses, args.plot, args.curves, args.block)
        return
    if args.file is None or args.every % args.chunk:
        p.error("--file is needed, and --every must be a multiple of --chunk")
    options = {k: getattr(args, k) for k in declared if getattr(args, k) is not None}
    result = run(args, options)
    print(json.dumps({k: v for k, v in result.items() if k not in ("snapshots", "curve")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
