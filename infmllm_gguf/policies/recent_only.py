"""Recent only: the most recent tokens and nothing else."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Policy, default_of, fixed
from .streaming_llm import StreamingLLM


@dataclass
class RecentOnly(StreamingLLM):
    """The ``budget`` most recent cells and nothing else: no attention sink, so the model collapses
    once the first tokens are gone (the "window attention" baseline of StreamingLLM, Xiao et al.
    2023, arXiv:2309.17453). Reads no attention. It takes no ``sinks`` option (that is the
    ``streaming-llm`` policy); ``recent`` (0 by default) only has to fit in the budget.
    """
    recent: int = default_of(Policy, "recent", 0)
    sinks: int = fixed(0)

    name: ClassVar[str] = "recent-only"
