"""Context shift: llama.cpp's own answer to a full context."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Observation, Policy, Selection, checked, fixed, option


@dataclass
class ContextShift(Policy):
    """llama.cpp's context shift (``tools/completion/completion.cpp``, formerly
    ``examples/main/main.cpp``; ``tools/server`` does the same), which runs when
    ``n_past + n_new >= n_ctx``::

        const int n_left    = n_past - params.n_keep;
        const int n_discard = n_left/2;
        llama_memory_seq_rm (mem, 0, params.n_keep            , params.n_keep + n_discard);
        llama_memory_seq_add(mem, 0, params.n_keep + n_discard, n_past, -n_discard);
        n_past -= n_discard;

    i.e. keep the first ``n_keep`` tokens, drop the oldest half (rounded down) of the rest, shift
    the others back. Here: the cells with stream indices < ``n_keep`` stay (they are the first
    cells, since this policy never evicts them; llama.cpp adds the BOS token to ``n_keep``, so
    count it in),
    ``n_left`` is the number of other cells, and ``n_left -= n_left // 2`` is applied once, or
    again as long as ``n_keep + n_left`` still exceeds the budget (as llama.cpp would shift again
    each time the context refilled, when a chunk longer than half the budget arrives); the
    ``n_left`` newest cells stay.

    Unlike the other policies it keeps **at most** ``budget`` cells, not exactly (``exact_budget``
    is False): about ``n_keep + (n - n_keep) / 2``. Note that llama.cpp shifts before decoding the
    new tokens, while ``select`` runs after a chunk is decoded, so the chunk counts in ``n_left``.

    ``sinks`` is ``n_keep`` (not an option of its own) and ``recent`` is 0: the newest half of the
    rest is kept anyway. Reads no attention.
    """
    recent: int = fixed(0)
    sinks: int = fixed(0)
    n_keep: int = option(4, "the first tokens kept by llama.cpp's context shift (BOS included)", minimum=0)

    name: ClassVar[str] = "context-shift"
    exact_budget: ClassVar[bool] = False

    def check(self) -> None:
        if self.budget <= self.n_keep:
            raise ValueError(f"budget ({self.budget}) must exceed n_keep ({self.n_keep}): "
                             f"raise --budget or lower --n-keep")
        self.sinks = self.n_keep

    def select(self, observation: Observation) -> Selection:
        indices = checked(self, observation).stream_indices
        keep = indices < self.n_keep
        n_head = int(np.count_nonzero(keep))
        n_left = indices.size - n_head
        n_left -= n_left // 2
        while n_head + n_left > self.budget:   # terminates: budget > n_keep >= n_head, so n_left >= 2
            n_left -= n_left // 2
        keep[indices.size - n_left:] = True
        return Selection(keep, None)
