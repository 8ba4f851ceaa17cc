"""The attention capture of `patches/` on a `Runtime`: which layers and how many of a decode's last
queries, and the scores they gave each cached cell. A part of `Runtime` (its base class), which
gives `ctx`, `model` and `kv_layers`."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from llama_cpp import llama_cpp as llama

from . import native
from .cell_state import SEQ


class CaptureError(RuntimeError):
    """Scores were asked for but none were captured."""


@dataclass(frozen=True)
class AttentionScores:
    """Attention that the last decode's captured queries gave to each cached cell.

    `scores[i, j]` is the attention probability that layer `layers[i]` gave to the cell at
    llama.cpp position `positions[j]`, summed over heads and over the `n_queries` captured queries
    (the last ones of the batch).
    """

    positions: np.ndarray  # int32 [n]
    scores: np.ndarray     # float32 [len(layers), n]
    layers: tuple[int, ...]
    n_queries: int


class AttentionCapture:
    """The capture methods of `Runtime`."""

    def _read_kv_layers(self) -> tuple[int, ...]:
        n = native.llama_attn_capture_kv_layers(self.ctx, None, 0)
        if n < 0:
            return ()  # a recurrent model: no KV cache
        layers = (ctypes.c_int32 * max(n, 1))()
        native.llama_attn_capture_kv_layers(self.ctx, layers, n)
        return tuple(layers[:n])

    def capture_scores(self, n_queries: int, layers: Sequence[int] | None = None) -> None:
        """Capture, at every following decode, the attention of its last `n_queries` queries (0: off)
        in `layers` (default: every layer that has a KV cache)."""
        if n_queries < 0:
            raise ValueError(f"the number of captured queries must be >= 0, not {n_queries}")
        if layers is None and len(self.kv_layers) < self.model.n_layer:
            layers = self.kv_layers
        if layers is None:
            rc = native.llama_attn_capture_set(self.ctx, n_queries, None, 0)
        else:
            if not layers:
                raise ValueError("layers must name at least one layer (or be None for all)")
            arr = (ctypes.c_int32 * len(layers))(*layers)
            rc = native.llama_attn_capture_set(self.ctx, n_queries, arr, len(layers))
        if rc != 0:
            raise ValueError(f"invalid capture layers {list(layers or [])} for a model of {self.model.n_layer} layers")
        self._captured_queries = n_queries
        self._capture_layers = tuple(range(self.model.n_layer)) if layers is None else tuple(sorted(set(layers)))

    def read_scores(self) -> AttentionScores:
        """The scores captured by the last decode, for the cells the sequence occupies now."""
        n = native.llama_attn_capture_get(self.ctx, SEQ, None, None, 0)
        if native.llama_attn_capture_n_queries(self.ctx) < 0:
            raise CaptureError("no attention scores were captured: call capture_scores(n_queries) before decoding")
        if n == -3:
            raise CaptureError(f"attention capture needs a KV cache; {self.model.architecture} is a recurrent model "
                               "and has none")
        if n < 0:
            raise CaptureError(f"llama_attn_capture_get failed with code {n}")
        positions = np.zeros(n, dtype=np.int32)
        scores = np.zeros((self.model.n_layer, n), dtype=np.float32)
        rc = native.llama_attn_capture_get(
            self.ctx, SEQ, positions.ctypes.data_as(ctypes.POINTER(llama.llama_pos)),
            scores.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        if rc != n:
            raise CaptureError(f"llama_attn_capture_get returned {rc}, expected {n}")
        layers = self._capture_layers
        return AttentionScores(positions, scores[list(layers)], layers,
                               native.llama_attn_capture_n_queries(self.ctx))
