"""StreamingLLM: the attention sinks plus the most recent tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Policy, Selection, check_inputs


@dataclass
class StreamingLLM(Policy):
    """StreamingLLM (Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with
    Attention Sinks", 2023, arXiv:2309.17453).

    Keeps the first ``sinks`` tokens of the stream (ids < sinks, when still cached; 4 by default as
    in the paper) and fills the rest of the budget with the most recent cells. Reads no attention
    (``capture_window`` is 0). ``recent`` (0 by default) only has to fit in the budget: every
    non-sink cell kept is a recent one anyway.
    """
    recent: int = 0
    sinks: int = 4

    name: ClassVar[str] = "streaming-llm"

    def select(self, ids: np.ndarray, attention: np.ndarray | None,
               memory: np.ndarray | None) -> Selection:
        ids, _, _ = check_inputs(self, ids, None, None, need_attention=False)
        keep = ids < self.sinks
        keep[ids.size - (self.budget - int(np.count_nonzero(keep))):] = True
        return Selection(keep=keep, memory=None)
