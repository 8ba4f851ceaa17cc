"""What the policy will judge the cached cells by: the attention captured since the last eviction.

`attention[l, i]` sums what the captured queries of layer l gave cell i, `visibility[i]` counts
the queries that could see it (`queries_seen`), `carried` is the score the policy carried from the
last eviction, and `unseen` counts the newest cells no captured query saw (uncaptured generation
steps). The controller fills it at each decode and empties it at each eviction.
"""
from __future__ import annotations

import numpy as np

from .policies import Observation


def queries_seen(n_old: int, chunk: int, n_queries: int, causal: bool) -> np.ndarray:
    """How many of a chunk's `n_queries` captured queries (its last ones) can attend to each cell:
    the `n_old` cells cached before the chunk, then the chunk's `chunk` cells (float64). A causal
    query sees the cells up to itself; a non-causal chunk (an image read both ways) sees all."""
    new = np.minimum(n_queries, chunk - np.arange(chunk)) if causal else np.full(chunk, n_queries)
    return np.concatenate((np.full(n_old, n_queries), new)).astype(np.float64)


class Scores:
    """The scores since the last eviction of a cache whose attention has `n_layer` rows."""

    def __init__(self, n_layer: int):
        self.n_layer = n_layer
        self.attention: np.ndarray | None = None   # float64 [n_layer, n]
        self.visibility: np.ndarray | None = None  # float64 [n]
        self.carried: np.ndarray | None = None     # float64 [n] ([n_layer, n] per layer)
        self.unseen = 0

    def added(self, n: int) -> None:
        """`n` new cells: they carry nothing from the last eviction."""
        if self.carried is not None:
            self.carried = np.concatenate((self.carried, np.zeros(self.carried.shape[:-1] + (n,))), axis=-1)

    def skipped(self, n: int) -> None:
        """`n` new cells that no captured query saw."""
        self.unseen += n

    def observe(self, scores: np.ndarray, visibility: np.ndarray, *, accumulate: bool) -> None:
        """The scores of the last decode (every cell), added to those since the last eviction or
        replacing them; every cell is seen now."""
        attention = scores.astype(np.float64)
        if accumulate and self.attention is not None:
            n_before = self.attention.shape[1]
            attention[:, :n_before] += self.attention
            visibility[:n_before] += self.visibility
        self.attention, self.visibility, self.unseen = attention, visibility, 0

    def cover(self, n: int) -> None:
        """Give the cells no captured query saw zero attention and a visibility of one, so that the
        observation covers all `n`; they are kept as recent cells, so these values only stand in.
        With no capture since the last eviction, every cell gets them, and the policy's tie rule
        (its bias toward newer cells) decides alone."""
        seen = 0 if self.attention is None else self.attention.shape[1]
        attention, visibility = np.zeros((self.n_layer, n)), np.ones(n)
        if seen:
            attention[:, :seen], visibility[:seen] = self.attention, self.visibility
        self.attention, self.visibility = attention, visibility

    def observation(self, stream_indices: np.ndarray) -> Observation:
        """What a policy that reads attention is given; RuntimeError if the scores do not cover
        every cell."""
        n = stream_indices.shape[-1]
        if self.attention is None or self.attention.shape[1] != n:
            raise RuntimeError("no attention scores cover the newest cells; decode a chunk before evicting")
        return Observation(stream_indices, self.attention, self.visibility, self.carried)

    def evicted(self, carried: np.ndarray | None) -> None:
        self.carried, self.attention, self.visibility, self.unseen = carried, None, None, 0

    # -- state ------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        return {name: value for name in ("attention", "visibility", "carried")
                if (value := getattr(self, name)) is not None}

    def check_state(self, arrays: dict[str, np.ndarray], n: int, unseen: object, rows: tuple[int, ...]) -> None:
        """Raise ValueError unless the saved scores fit `n` cells of which `unseen` were not seen
        (`rows`: the leading shape a per-layer carried score has)."""
        if not isinstance(unseen, int) or not 0 <= unseen <= n:
            raise ValueError(f"the saved count of unseen cells ({unseen!r}) is not in [0, {n}]")
        seen, carried = n - unseen, arrays.get("carried")
        for name, shape in (("attention", (self.n_layer, seen)), ("visibility", (seen,)),
                            ("carried", rows + (n,) if carried is not None and carried.ndim == 2 else (n,))):
            value = arrays.get(name)
            if value is not None and value.shape != shape:
                raise ValueError(f"the saved {name} has shape {value.shape}, the saved cells need {shape}")
        if (arrays.get("attention") is None) != (arrays.get("visibility") is None):
            raise ValueError("the saved attention and visibility come together or not at all")

    def load_state(self, arrays: dict[str, np.ndarray], unseen: int) -> None:
        for name in ("attention", "visibility", "carried"):
            value = arrays.get(name)
            setattr(self, name, None if value is None else value.astype(np.float64))
        self.unseen = unseen
