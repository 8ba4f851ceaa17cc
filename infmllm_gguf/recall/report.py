"""Recall results as people read them: a table of accuracy by distance, and a heatmap (distance x
policy and budget), as needle-in-a-haystack plots are drawn."""
from __future__ import annotations

import os
from typing import Sequence

from ..extras import pyplot
from .run import RecallRun


def distance_label(d: int) -> str:
    for unit in (1024, 1000):  # 4096 -> 4k, 200000 -> 200k
        if d >= unit and d % unit == 0:
            return f"{d // unit}k"
    return str(d)


def cell(right: int, n: int) -> str:
    return f"{right}/{n}"


def table(runs: Sequence[RecallRun], distances: Sequence[int]) -> str:
    """Correct/trials per asked distance, one row per run, with the overall share."""
    width = max([len("policy")] + [len(r.label()) for r in runs])
    cols = [distance_label(d) for d in distances]
    head = f"{'policy':{width}s} " + " ".join(f"{c:>7s}" for c in cols) + f" {'all':>7s}"
    lines = [head, "-" * len(head)]
    for r in runs:
        acc = r.accuracy()
        cells = [cell(*acc[d]) if d in acc else "-" for d in distances]
        right, n = sum(a.correct for a in r.answers), len(r.answers)
        share = f"{100 * right / n:.0f}%" if n else "-"
        lines.append(f"{r.label():{width}s} " + " ".join(f"{c:>7s}" for c in cells) + f" {share:>7s}")
        if r.stopped_at is not None:
            lines.append(f"{'':{width}s} stopped before the snapshot at {r.stopped_at} tokens: "
                         "the stream outgrew the model's context")
    return "\n".join(lines)


def heatmap(runs: Sequence[RecallRun], distances: Sequence[int], path: str | os.PathLike, title: str = "") -> None:
    """Accuracy per (run, distance) as colours, correct/trials written in each cell; a distance a run
    did not reach (full past the model's context) is left grey."""
    import numpy as np

    plt = pyplot("a recall heatmap (--png)")

    grid = np.full((len(runs), len(distances)), np.nan)
    text = [["" for _ in distances] for _ in runs]
    for i, r in enumerate(runs):
        acc = r.accuracy()
        for j, d in enumerate(distances):
            if d in acc:
                right, n = acc[d]
                grid[i, j] = right / n
                text[i][j] = cell(right, n)
    fig, ax = plt.subplots(figsize=(1.1 * len(distances) + 3.5, 0.42 * len(runs) + 1.6))
    cmap = plt.colormaps["RdYlGn"].copy()
    cmap.set_bad("#d0d0d0")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(len(runs)):
        for j in range(len(distances)):
            ax.text(j, i, text[i][j] or "n/a", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(distances)), [distance_label(d) for d in distances])
    ax.set_yticks(range(len(runs)), [r.label() for r in runs], fontsize=7)
    ax.set_xlabel("distance from the needle to the question (tokens)")
    ax.set_title(title or "recall after the stream")
    fig.colorbar(image, ax=ax, label="exact-match accuracy", fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
