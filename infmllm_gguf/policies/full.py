"""Full: no eviction, the unbounded reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Observation, Policy, Selection, fixed


@dataclass
class Full(Policy):
    """No eviction: every token stays, so the stream must fit the budget (and the model's
    training context). The quality reference of the other policies. Reads no attention;
    ``select`` is never legitimately called: it raises RuntimeError.
    """
    recent: int = fixed(0)
    sinks: int = fixed(0)

    name: ClassVar[str] = "full"
    evicts: ClassVar[bool] = False

    def select(self, observation: Observation) -> Selection:
        raise RuntimeError(f"the stream ({len(observation.stream_indices)} tokens) outgrew the budget of "
                           f"{self.budget} cells with policy 'full'; raise --budget or use a bounded policy")
