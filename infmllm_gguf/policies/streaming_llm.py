"""StreamingLLM: the attention sinks plus the most recent tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Observation, Policy, ScoredPolicy, default_of


@dataclass
class StreamingLLM(ScoredPolicy):
    """StreamingLLM (Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with
    Attention Sinks", 2023, arXiv:2309.17453).

    Keeps the first ``sinks`` tokens of the stream (when still cached; 4 by default as in the
    paper) and fills the rest of the budget with the newest cells: the score is the stream index.
    Reads no attention. ``recent`` (0 by default) only has to fit in the budget: every non-sink
    cell kept is a recent one anyway.
    """
    recent: int = default_of(Policy, "recent", 0)
    sinks: int = default_of(Policy, "sinks", 4)

    name: ClassVar[str] = "streaming-llm"

    def score(self, obs: Observation, candidates: np.ndarray) -> tuple[np.ndarray, None]:
        return obs.stream_indices.astype(np.float64), None
