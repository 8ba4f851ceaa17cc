"""Window: the most recent tokens only."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .base import Policy, Selection, check_inputs


@dataclass
class Window(Policy):
    """Sliding window: keeps the ``budget`` most recent cells and nothing else (no attention sink,
    so the model collapses once the first tokens are gone: the baseline of StreamingLLM, Xiao et
    al. 2023, arXiv:2309.17453). Reads no attention (``capture_window`` is 0).

    It takes no ``sinks`` option (that is the ``streaming-llm`` policy); ``recent`` (0 by default)
    only has to fit in the budget: every cell kept is a recent one.
    """
    recent: int = 0
    sinks: int = field(default=0, init=False)

    name: ClassVar[str] = "window"

    def select(self, ids: np.ndarray, attention: np.ndarray | None,
               memory: np.ndarray | None) -> Selection:
        ids, _, _ = check_inputs(self, ids, None, None, need_attention=False)
        keep = np.zeros(ids.size, dtype=bool)
        keep[ids.size - self.budget:] = True
        return Selection(keep=keep, memory=None)
