"""Where the cached cells sit: positions from each cell's advance, and images kept whole.

A text token, and an image token of most models, takes one position: the next token comes one
position later. An M-RoPE model (Qwen2-VL and later) lays an image out as libmtmd does: every cell
of the image shares the image's first (time) position, its height and width positions grow across
the grid, and the next token comes `n_pos` positions later (the larger side of the grid). Each
cell's *advance* says this: 1 for a text cell, 0 for an M-RoPE image's cells but the last, `n_pos`
for that one. Re-indexed positions are the running sum of the advances of the cells kept, so an
image keeps its layout and everything after it moves by whole positions.

llama.cpp removes cells by position, and an M-RoPE image's cells share one: such an image is kept
or evicted whole (`keep_images_whole`). Pure NumPy.
"""
from __future__ import annotations

import numpy as np


def positions(advance: np.ndarray) -> np.ndarray:
    """The position of each cell when the first sits at 0: the running sum of the advances before it."""
    return np.concatenate(([0], np.cumsum(advance)[:-1])).astype(np.int64) if advance.size else np.zeros(0, np.int64)


def image_groups(advance: np.ndarray) -> list[tuple[int, int]]:
    """The [a, b) ranges of cells that share a position (an M-RoPE image's): runs of zero advance
    and the cell that ends them."""
    starts = np.flatnonzero((advance == 0) & np.concatenate(([True], advance[:-1] != 0)))
    ends = [int(np.flatnonzero(advance[a:] != 0)[0]) + a + 1 for a in starts]
    return list(zip(starts.tolist(), ends))


def image_layout(offsets: np.ndarray, start: int) -> np.ndarray:
    """An M-RoPE image's positions [4, n] (time, height, width, fourth) when it begins at `start`:
    libmtmd's offsets from the image's first position, moved there (the fourth axis does not move)."""
    out = np.asarray(offsets, dtype=np.int64).copy()
    out[:3] += start
    return out


def keep_images_whole(keep: np.ndarray, advance: np.ndarray, budget: int) -> np.ndarray:
    """`keep` (bool per cell) with each M-RoPE image kept or dropped whole: of the images the policy
    kept in part, those with at least half their cells kept are completed, the most complete first,
    while the budget has room for them (the others dropped make that room); the rest are dropped.
    Never more than max(budget, cells kept) cells."""
    keep = keep.copy()
    limit = max(budget, int(np.count_nonzero(keep)))
    candidates = []
    for a, b in image_groups(advance):
        kept = int(np.count_nonzero(keep[a:b]))
        if 0 < kept < b - a:
            keep[a:b] = False
            if kept * 2 >= b - a:
                candidates.append((-kept / (b - a), a, b))
    for _, a, b in sorted(candidates):
        if np.count_nonzero(keep) + (b - a) <= limit:
            keep[a:b] = True
    return keep
