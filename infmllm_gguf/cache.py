"""The cache controller: a llama.cpp sequence kept to a fixed number of cells by an eviction policy.

It decodes chunks of tokens, reads attention scores only when the policy needs them, removes the
cells the policy drops (`llama_memory_seq_rm`, one call per run of dropped cells) and re-indexes
the survivors to contiguous positions 0..n-1 (`llama_memory_seq_add`, one call per run of kept
cells), as StreamingLLM does, so a model trained on a 4k or 8k window can read an endless stream.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from .policies import Policy
from .runtime import Runtime


@dataclass
class CacheStats:
    tokens_seen: int = 0
    cells_cached: int = 0
    peak_cells: int = 0      # most cells held at once (right after a decode, before eviction)
    cells_evicted: int = 0
    evictions: int = 0
    capture_s: float = 0.0   # reading and aligning attention scores
    evict_s: float = 0.0     # selecting, removing cells and re-indexing positions
    decode_s: float = 0.0    # llama_decode, capture side branch included
    image_tokens_seen: int = 0    # image embeddings decoded (they are also counted in tokens_seen)
    image_cells_cached: int = 0
    image_cells_evicted: int = 0


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open index ranges [a, b) of the True runs of a boolean array."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


class CacheController:
    """Owns the stream state of one `Runtime` sequence under `policy`.

    `ids[i]` is the stream index (original token number) of the i-th cached cell; with
    re-indexing its position in llama.cpp is `i`, else it is `ids[i]` itself. `image[i]` says
    whether that cell holds an image embedding rather than a text token.
    """

    def __init__(self, runtime: Runtime, policy: Policy, *, generation_headroom: int = 32):
        self.rt = runtime
        self.policy = policy
        self.generation_headroom = generation_headroom
        self.reindex = runtime.can_shift()
        if not self.reindex:
            warnings.warn(f"{runtime.model_path.name}: llama.cpp cannot shift this model's positions (M-RoPE or "
                          "similar); cached tokens keep their original positions, which grow with the stream",
                          stacklevel=3)
        # H2O (and a decaying Inf-MLLM) sum the attention of every decode between two evictions;
        # Inf-MLLM with decay 0 uses only the last chunk's retrieval window
        self.accumulates = getattr(policy, "decay", 1.0) > 0
        self.reset_state()

    def reset_state(self) -> None:
        self.ids = np.zeros(0, dtype=np.int64)
        self.image = np.zeros(0, dtype=bool)
        self._stats = CacheStats()
        self.memory: np.ndarray | None = None
        self.pending: np.ndarray | None = None  # attention since the last eviction [n_layer, n]
        self._window = -1

    def reset(self) -> None:
        self.rt.clear()
        self.reset_state()

    @property
    def stats(self) -> CacheStats:
        """The counters, with `cells_cached` read from the cache state (it changes on decode and evict)."""
        self._stats.cells_cached = int(self.ids.size)
        self._stats.image_cells_cached = int(np.count_nonzero(self.image))
        return self._stats

    @property
    def n_cached(self) -> int:
        return int(self.ids.size)

    def positions(self) -> np.ndarray:
        """The llama.cpp positions of the cached cells, in stream order."""
        return np.arange(self.ids.size) if self.reindex else self.ids.copy()

    # -- saving -----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The controller's state: JSON-able settings and counters, and arrays. llama.cpp's cells
        are saved apart (`Runtime.get_state`)."""
        arrays = {"ids": self.ids, "image": self.image}
        for name in ("memory", "pending"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        return {"stats": asdict(self._stats), "reindex": self.reindex}, arrays

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Take over a state from `state_dict`, once llama.cpp's cells are loaded."""
        if meta["reindex"] != self.reindex:
            raise ValueError("the saved stream was re-indexed and this model cannot be (or the reverse)")
        ids = np.asarray(arrays["ids"], dtype=np.int64)
        if self.rt.n_cached() != ids.size:
            raise ValueError(f"the saved cache holds {self.rt.n_cached()} cells, its stream state {ids.size}")
        image = np.asarray(arrays["image"], dtype=bool)
        if image.shape != ids.shape:
            raise ValueError(f"the saved image flags ({image.size}) do not match the saved cells ({ids.size})")
        self.ids, self.image = ids, image
        self.memory = arrays.get("memory")
        self.pending = arrays.get("pending")
        self._stats = CacheStats(**meta["stats"])
        self._window = -1  # the capture setting is not part of llama.cpp's state: set it again

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, tokens, *, logits: str = "last", generating: bool = False) -> None:
        """Decode one chunk, then evict if the cache holds more than the budget.

        `tokens`: token ids, or a float array [n, n_embd] of input embeddings (an image's), which
        then take cells, scores and evictions like tokens and are counted as image tokens.
        While `generating` (one token at a time) the scores of successive steps add up and
        eviction waits until the cache reaches budget + generation_headroom.
        """
        n = len(tokens)
        is_image = isinstance(tokens, np.ndarray) and tokens.dtype.kind == "f"
        window = self.policy.capture_window(n)
        if window != self._window:
            self.rt.capture_scores(window)
            self._window = window
        start = self.ids.size if self.reindex else self._stats.tokens_seen
        t0 = time.perf_counter()
        decode = self.rt.decode_embeddings if is_image else self.rt.decode
        decode(tokens, range(start, start + n), logits=logits)
        t1 = time.perf_counter()
        self._stats.decode_s += t1 - t0

        first = self._stats.tokens_seen
        self.ids = np.concatenate((self.ids, np.arange(first, first + n, dtype=np.int64)))
        self.image = np.concatenate((self.image, np.full(n, is_image)))
        self._stats.tokens_seen += n
        self._stats.image_tokens_seen += n if is_image else 0
        self._stats.peak_cells = max(self._stats.peak_cells, int(self.ids.size))
        if self.memory is not None:
            self.memory = np.concatenate((self.memory, np.zeros(n)))
        if window:
            self._add_attention(accumulate=self.accumulates or generating)
            self._stats.capture_s += time.perf_counter() - t1

        limit = self.policy.budget + (self.generation_headroom if generating else 0)
        if self.ids.size > limit or (generating and self.ids.size >= limit):
            self.evict()

    def _add_attention(self, *, accumulate: bool) -> None:
        captured = self.rt.read_scores()
        if captured.positions.size != self.ids.size or not np.array_equal(captured.positions, self.positions()):
            raise RuntimeError(f"llama.cpp holds {captured.positions.size} cells for the sequence, the controller "
                               f"{self.ids.size}: the cache was edited behind the controller's back")
        attention = captured.scores.astype(np.float64)
        if accumulate and self.pending is not None:
            grown = np.zeros_like(attention)
            grown[:, :self.pending.shape[1]] = self.pending
            attention += grown
        self.pending = attention

    # -- eviction ---------------------------------------------------------------------------
    def evict(self) -> int:
        """Apply the policy once; returns the number of cells removed."""
        if self.ids.size <= self.policy.budget:
            return 0
        t0 = time.perf_counter()
        attention = self.pending if self.policy.needs_attention else None
        if attention is not None and attention.shape[1] != self.ids.size:
            raise RuntimeError("no attention scores cover the newest cells; decode a chunk before evicting")
        memory = self.memory if self.memory is not None and self.policy.needs_attention else None
        selection = self.policy.select(self.ids, attention, memory)
        keep = selection.keep
        pos = self.positions()
        for a, b in reversed(runs(~keep)):  # removing from the end keeps earlier positions valid
            self.rt.remove(int(pos[a]), int(pos[b - 1]) + 1)
        if self.reindex:
            removed_before = np.cumsum(~keep) - (~keep)
            for a, b in runs(keep):
                if removed_before[a]:
                    self.rt.shift(int(pos[a]), int(pos[b - 1]) + 1, -int(removed_before[a]))
        n_removed = int(np.count_nonzero(~keep))
        self.ids = self.ids[keep]
        self._stats.image_cells_evicted += int(np.count_nonzero(self.image[~keep]))
        self.image = self.image[keep]
        self.memory = selection.memory
        self.pending = None
        self._stats.cells_evicted += n_removed
        self._stats.evictions += 1
        self._stats.evict_s += time.perf_counter() - t0
        return n_removed
