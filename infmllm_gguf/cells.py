"""The cells of a cached sequence: which token each holds and how an eviction is applied to them.

Two layouts behind one interface, chosen once by the controller (kvpress wraps a press the same
way): `TokenCells`, one decision for every layer (the dropped cells removed, the survivors shifted
back), and `LayerCells`, each layer keeping its own tokens (`Runtime.compact`). Cell i is position
i in every layer of a `LayerCells`; its `stream_indices[i]` is the newest token any layer holds there.
With re-indexing a cell's llama.cpp position is the sum of the `advance` of the cells before it
(`i` when every cell takes one position; an M-RoPE image's cells share one), else its stream index.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .layout import keep_images_whole, positions
from .policies import Policy, Selection


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open index ranges [a, b) of the True runs of a boolean array."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


class TokenCells:
    """One row of cells for every layer: `stream_indices[i]`, `is_image[i]` and `advance[i]` of cell i."""
    per_layer = False

    def __init__(self, n_layer: int):
        self.n_layer = n_layer
        self.stream_indices = np.zeros(0, dtype=np.int64)
        self.is_image = np.zeros(self.rows + (0,), dtype=bool)
        self.advance = np.zeros(0, dtype=np.int64)  # positions each cell moves the next one on

    def positions(self, reindex: bool) -> np.ndarray:
        """The llama.cpp positions of the cells, in stream order."""
        return positions(self.advance) if reindex else self.stream_indices.copy()

    @property
    def rows(self) -> tuple[int, ...]:
        """The leading shape of per-cell arrays that differ by layer: () here, (n_layer,) per layer."""
        return ()

    @property
    def held_by_layer(self) -> np.ndarray:
        """The stream indices each layer holds: one row [1, n] when one decision serves every layer."""
        return self.stream_indices[None]

    @property
    def observed(self) -> np.ndarray:
        """The stream indices a policy's `Observation` is given: [n], or [n_layer, n] per layer."""
        return self.stream_indices

    def image_stream_indices(self) -> np.ndarray:
        """The stream indices of the cached image tokens, ascending (per layer: held by some layer)."""
        return np.unique(self.held_by_layer[np.atleast_2d(self.is_image)])

    def append(self, new: np.ndarray, is_image: bool, layout: tuple[np.ndarray, int] | None = None) -> None:
        """New cells for the stream indices `new` (an M-RoPE image's `layout`: its cells share a position)."""
        self.stream_indices = np.concatenate((self.stream_indices, new))
        self.is_image = np.concatenate((self.is_image, np.full(self.rows + (new.size,), is_image)), axis=-1)
        advance = np.ones(new.size, dtype=np.int64)
        if layout is not None:
            advance[:-1], advance[-1] = 0, layout[1]
        self.advance = np.concatenate((self.advance, advance))

    def settle(self, selection: Selection, budget: int) -> Selection:
        """`selection` with every M-RoPE image kept or dropped whole (llama.cpp removes cells by
        position, which an image's cells share): `layout.keep_images_whole`; a cell it adds carries 0."""
        if np.all(self.advance == 1):
            return selection
        keep = keep_images_whole(selection.keep, self.advance, budget)
        carried = selection.carried
        if carried is not None:
            full = np.zeros(keep.size)
            full[selection.keep] = carried
            carried = full[keep]
        return replace(selection, keep=keep, carried=carried)

    def apply(self, selection: Selection, runtime, reindex: bool) -> None:
        """Remove the dropped cells (one call per run), shift the kept ones back when `reindex`
        (one call per run)."""
        keep, pos, advance = selection.keep, self.positions(reindex), self.advance
        for a, b in reversed(runs(~keep)):  # removing from the end keeps earlier positions valid
            runtime.remove(int(pos[a]), int(pos[b - 1]) + 1)
        if reindex:
            moved = positions(advance[keep]) - pos[keep]  # each kept cell's new position - its old one
            first = np.cumsum(keep) - 1  # the index among the kept cells
            for a, b in runs(keep):
                if moved[first[a]]:
                    runtime.shift(int(pos[a]), int(pos[b - 1]) + 1, int(moved[first[a]]))
        self.stream_indices = self.stream_indices[keep]
        self.is_image = self.is_image[keep]
        self.advance = advance[keep]

    # -- state ------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        return {"stream_indices": self.stream_indices, "is_image": self.is_image, "advance": self.advance}

    def check_state(self, arrays: dict[str, np.ndarray], n: int) -> None:
        """Raise ValueError unless the saved arrays fit this layout (`n`: the saved cells)."""
        if arrays.get("layer_indices") is not None:
            raise ValueError("the saved stream was evicted per layer and this policy decides per token")
        self._check_common(arrays, n)

    def _check_common(self, arrays: dict[str, np.ndarray], n: int) -> None:
        value = arrays.get("is_image")
        if value is None:
            raise ValueError("the saved image flags are missing")
        if value.shape != self.rows + (n,):
            raise ValueError(f"the saved is_image has shape {value.shape}, the saved cells need {self.rows + (n,)}")
        advance = arrays.get("advance")  # absent from files saved before M-RoPE images: one position a cell
        if advance is not None and (advance.shape != (n,) or np.any(advance < 0)):
            raise ValueError(f"the saved advances are not {n} non-negative numbers")

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.stream_indices = arrays["stream_indices"].astype(np.int64)
        self.is_image = arrays["is_image"].astype(bool)
        self.advance = arrays.get("advance", np.ones(self.stream_indices.size)).astype(np.int64)


class LayerCells(TokenCells):
    """Each layer's own cells: `layer_indices[l, i]` is the stream index of the token layer l holds
    in cell i, `is_image[l, i]` flags it. Needs a plain (not sliding-window) cache whose positions
    can be shifted (`Runtime.can_compact`)."""
    per_layer = True

    def __init__(self, n_layer: int):
        self.layer_indices = np.zeros((n_layer, 0), dtype=np.int64)
        super().__init__(n_layer)

    @property
    def rows(self) -> tuple[int, ...]:
        return (self.n_layer,)

    @property
    def held_by_layer(self) -> np.ndarray:
        return self.layer_indices

    @property
    def observed(self) -> np.ndarray:
        return self.layer_indices

    def append(self, new: np.ndarray, is_image: bool, layout: tuple[np.ndarray, int] | None = None) -> None:
        super().append(new, is_image, layout)
        self.layer_indices = np.concatenate((self.layer_indices, np.broadcast_to(new, (self.n_layer, new.size))),
                                            axis=1)

    def settle(self, selection: Selection, budget: int) -> Selection:
        return selection  # text only: every cell takes one position

    def apply(self, selection: Selection, runtime, reindex: bool) -> None:
        """Each layer keeps its own cells (`selection.keep[l]`), compacted to positions 0..budget-1."""
        pos = self.positions(reindex)
        runtime.compact(np.stack([pos[row] for row in selection.keep]))
        self.layer_indices = np.stack([row[keep] for row, keep in zip(self.layer_indices, selection.keep)])
        self.stream_indices = self.layer_indices.max(axis=0)
        self.is_image = np.stack([row[keep] for row, keep in zip(self.is_image, selection.keep)])
        self.advance = np.ones(self.stream_indices.size, dtype=np.int64)

    def state(self) -> dict[str, np.ndarray]:
        return {**super().state(), "layer_indices": self.layer_indices}

    def check_state(self, arrays: dict[str, np.ndarray], n: int) -> None:
        layer_indices = arrays.get("layer_indices")
        if layer_indices is None:
            raise ValueError("the saved stream was evicted per token and this policy decides per layer")
        if layer_indices.shape != (self.n_layer, n) or np.any(np.diff(layer_indices) <= 0):
            raise ValueError(f"the saved per-layer stream indices are not {self.n_layer} increasing rows of {n}")
        if arrays.get("is_image") is not None and arrays["is_image"].shape == (n,):
            arrays["is_image"] = np.broadcast_to(arrays["is_image"], (self.n_layer, n))  # saved before per-layer images
        self._check_common(arrays, n)

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state(arrays)
        self.layer_indices = arrays["layer_indices"].astype(np.int64)


def cell_layout(runtime, policy: Policy, shared_image_positions: bool) -> tuple[Policy, type[TokenCells]]:
    """The policy with its granularity settled for this runtime's model, and the cell layout it
    runs on: "auto" settles on per-layer cells where llama.cpp can compact each layer's cache on
    its own (a plain or hybrid cache with shiftable positions), on per-token cells elsewhere, so
    that records and saves name what ran. ValueError for "layer" where it cannot."""
    # an M-RoPE image's cells share one position, which a per-layer compaction cannot tell apart
    compactable = runtime.can_compact() and not shared_image_positions
    granularity = getattr(policy, "granularity", "token")
    if granularity == "auto":
        granularity = "layer" if compactable else "token"
        policy = replace(policy, granularity=granularity)
    if granularity == "layer" and not compactable:
        raise ValueError(f"{runtime.model.name}: per-layer eviction (--granularity layer) compacts a plain or "
                         "hybrid KV cache with shiftable positions; this model has sliding-window layers, MLA's "
                         "compressed keys or positions llama.cpp cannot shift: use --granularity token (or auto)")
    return policy, LayerCells if granularity == "layer" else TokenCells
