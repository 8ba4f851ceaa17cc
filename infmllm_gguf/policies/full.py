"""Full: no eviction, the unbounded reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .base import Policy, Selection


@dataclass
class Full(Policy):
    """No eviction: every token stays, so the stream must fit the model's context (``budget`` is
    that context). The quality reference of the other policies. Reads no attention. ``select``
    is never legitimately called: it raises RuntimeError.
    """
    recent: int = field(default=0, init=False)
    sinks: int = field(default=0, init=False)

    name: ClassVar[str] = "full"

    def select(self, ids: np.ndarray, attention: np.ndarray | None,
               memory: np.ndarray | None) -> Selection:
        raise RuntimeError(f"the stream ({len(ids)} tokens) outgrew the context with policy 'full'; "
                           f"use a bounded policy")
