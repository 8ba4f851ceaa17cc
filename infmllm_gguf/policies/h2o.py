"""H2O: heavy hitters (accumulated attention of every query) plus the recent tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Policy, Selection, _check_chunk, check_inputs, keep_top, protected


@dataclass
class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang,
    Chen, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    2023, arXiv:2306.14048).

    Every query of every chunk is captured (``capture_window(chunk) = chunk``); a cell's score is
    the attention it received, summed over heads and queries, averaged over layers (llama.cpp keeps
    one cell per token for all layers), and accumulated without decay over the chunks it was cached
    for: ``S = memory + a``. There is no visibility averaging (H2O sums raw attention, so older
    cells, seen by more queries, are favoured) and no bias. Kept: the ``recent`` highest ids, the
    sinks present (ids < ``sinks``, 0 by default as in H2O), and the best-scored other cells
    (equal scores: the newer wins). ``Selection.memory`` is ``S`` of the kept cells.

    The controller must pass the attention of all the queries decoded since the previous
    selection (summed over chunks when several were decoded in between), or H2O's sum loses them.
    """
    recent: int = 64
    sinks: int = 0

    name: ClassVar[str] = "h2o"

    def capture_window(self, chunk: int) -> int:
        _check_chunk(chunk)
        return int(chunk)

    def select(self, ids: np.ndarray, attention: np.ndarray | None,
               memory: np.ndarray | None) -> Selection:
        ids, attention, memory = check_inputs(self, ids, attention, memory, need_attention=True)
        s = attention.mean(axis=0)
        if memory is not None:
            s = memory + s
        keep = keep_top(protected(ids, self.recent, self.sinks), s, self.budget)
        return Selection(keep=keep, memory=s[keep])
