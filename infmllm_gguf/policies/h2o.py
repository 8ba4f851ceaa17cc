"""H2O: heavy hitters (accumulated attention of every query) plus the recent tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Observation, ScoredPolicy, granularity_option


@dataclass
class H2O(ScoredPolicy):
    """Heavy-Hitter Oracle (Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang,
    Chen, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    2023, arXiv:2306.14048).

    Every query of every chunk is captured; a cell's score is the attention it received, summed
    over heads and queries, averaged over layers (llama.cpp keeps one cell per token for all
    layers), and added up without decay over every decode it was cached for: ``S = carried + a``.
    No visibility average (H2O sums raw attention, so older cells, seen by more queries, are
    favoured) and no bias. The base keeps the ``recent`` newest, the sinks present (0 by default,
    as in H2O) and the best-scored others. ``Selection.carried`` is ``S`` of the kept cells.

    ``granularity`` "layer" (or "auto", per layer where the cache allows it) runs the rule on each
    layer's own attention and keeps each layer's own heavy hitters (`ScoredPolicy`); "token", the
    default, is H2O's one decision for all layers.
    """
    granularity: str = granularity_option("token")

    name: ClassVar[str] = "h2o"
    reads_attention: ClassVar[bool] = True

    def capture_queries(self, chunk: int) -> int:
        return chunk

    @property
    def accumulates_attention(self) -> bool:
        return True

    def score(self, obs: Observation, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = obs.attention.mean(axis=0)
        if obs.carried is not None:
            s = obs.carried + s
        return s, s
