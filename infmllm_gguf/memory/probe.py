"""The `attention` ranking's second step: the lexical shortlist re-read with the query after it
(`CacheController.probe`), ordered by the attention the query gives each block."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .images import IMAGE_ID
from .ranking import choose

if TYPE_CHECKING:
    from ..controller import CacheController


def rerank_by_attention(cache: "CacheController", order: np.ndarray, starts: np.ndarray, window: int,
                        ids: np.ndarray, query: Sequence[int]) -> np.ndarray:
    """The lexical shortlist that fits the context's free cells, re-read with the query after it
    and ordered by the attention the query's tokens give each block (its cells' scores summed
    over layers, heads and queries); the cache is put back as it was. Blocks beyond the
    shortlist keep their lexical order after it."""
    free = cache.runtime.n_ctx - cache.n_cached - len(query) - 1  # putting the cells back takes one
    spans = choose(order, starts, window, ids.size, free)
    if not spans:
        return order
    probe = np.concatenate([np.arange(a, b) for a, b in spans])  # stored token numbers, in order
    probe = probe[ids[probe] != IMAGE_ID]  # the probe reads the blocks' text
    attention = np.zeros(ids.size)
    attention[probe] = cache.probe(ids[probe].tolist(), list(query))
    ends = np.minimum(starts + window, ids.size)
    probed = np.zeros(ids.size, dtype=bool)
    probed[probe] = True
    whole = np.array([probed[starts[k]:ends[k]].all() for k in order])
    shortlist, rest = order[whole], order[~whole]
    count = np.concatenate(([0], np.cumsum(attention)))
    mass = count[ends[shortlist]] - count[starts[shortlist]]
    return np.concatenate((shortlist[np.argsort(-mass, kind="stable")], rest))
