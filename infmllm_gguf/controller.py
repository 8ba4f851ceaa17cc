"""The cache controller: a llama.cpp sequence kept to a fixed number of cells by an eviction policy.

It decodes chunks of tokens (or image embeddings), reads attention scores only when the policy
reads them, removes the cells the policy drops (`llama_memory_seq_rm`, one call per run of dropped
cells) and re-indexes the survivors to contiguous positions 0..n-1 (`llama_memory_seq_add`, one
call per run of kept cells), as StreamingLLM does, so a model trained on a 4k or 8k window can
read an endless stream.
"""
from __future__ import annotations

import collections
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Sequence

import numpy as np

from .cells import cell_layout
from .layout import image_layout
from .policies import Observation, Policy
from .runtime import Runtime
from .scores import Scores, queries_seen


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


@dataclass(frozen=True)
class Decoded:
    """What one decode put in the cache, as the controller tells its listeners: token ids (a list)
    or an image's embeddings (float [n, n_embd]), their new stream indices, whether they were read
    causally, an M-RoPE image's layout, and `copies`: for the first `copies.size` of them, the
    stream indices of the tokens they copy (a re-read), else empty."""
    tokens: list | np.ndarray
    indices: np.ndarray
    causal: bool = True
    layout: tuple[np.ndarray, int] | None = None
    copies: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def is_image(self) -> bool:
        return isinstance(self.tokens, np.ndarray) and self.tokens.dtype.kind == "f"


class CacheController:
    """Owns the stream state of one `Runtime` sequence under `policy`.

    `cells` (`TokenCells`, or `LayerCells` when the policy decides per layer) says which stream
    index (token number in the stream) each cached cell holds and whether it is an image
    embedding, and its llama.cpp position. `scores` holds what the captured queries gave each cell since
    the last eviction (`Scores`).

    While generating, eviction comes every `generation_headroom` steps and a step is captured only
    if the policy will read it (`reads_generation_step`); the others are not observed at all. The
    cells decoded after the last captured step (`scores.unseen`) are kept at an eviction that comes
    before the planned one (a generation that stops early), as the recent cells are.

    A policy's granularity "auto" settles on the layout the model allows (`cell_layout`). With
    `view_tokens` > 0, `recent_tokens` keeps the token ids of the last `view_tokens` tokens of the stream,
    evicted or not (-1 for an image embedding): a view for a user interface, bounded. Each decode is told
    to the `listeners` given (callables taking a `Decoded`): the memory is one.
    """

    def __init__(self, runtime: Runtime, policy: Policy, *, generation_headroom: int = 32, view_tokens: int = 0,
                 shared_image_positions: bool = False, listeners: Sequence[Callable[[Decoded], None]] = ()):
        self.runtime = runtime
        self.policy = policy
        self.generation_headroom = generation_headroom
        self.view_tokens = view_tokens
        self.listeners = tuple(listeners)
        if not runtime.kv_layers:
            raise ValueError(f"{runtime.model.name} ({runtime.model.architecture}) is a recurrent model: it has no KV "
                             "cache to bound, its state is of fixed size already")
        self.reindex = runtime.can_shift()
        if shared_image_positions and not self.reindex:
            raise ValueError(f"{runtime.model.name}: its images' cells share positions (M-RoPE) and llama.cpp cannot "
                             "shift them: images are not supported for this model")
        self.policy, self.layout = cell_layout(runtime, policy, shared_image_positions)
        if not self.reindex:
            warnings.warn(f"{runtime.model.name}: llama.cpp cannot shift this model's positions "
                          f"({runtime.model.architecture}); cached tokens keep their original positions, which grow "
                          "with the stream", stacklevel=3)
        self.reset_state()

    def reset_state(self) -> None:
        self.cells = self.layout(len(self.runtime.kv_layers))
        self._stats = CacheStats()
        self.scores = Scores(len(self.runtime.kv_layers))
        self.recent_tokens: collections.deque[int] = collections.deque(maxlen=self.view_tokens)
        self._captured_queries = -1  # what the runtime is set to capture; -1: not set since a load

    def reset(self) -> None:
        self.runtime.clear()
        self.reset_state()

    def keep_positions(self) -> None:
        """Never re-index (the path of models that cannot shift, which the benchmark measures on any)."""
        self.reindex = False

    @property
    def stats(self) -> CacheStats:
        """A copy of the counters, the cached cells counted from the cache state."""
        return replace(self._stats, cells_cached=self.n_cached,
                       image_cells_cached=int(self.cells.image_stream_indices().size))

    @property
    def n_cached(self) -> int:
        return int(self.cells.stream_indices.size)

    def positions(self) -> np.ndarray:
        """The llama.cpp positions of the cached cells, in stream order."""
        return self.cells.positions(self.reindex)

    # -- state ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The controller's state for a save: counters and arrays. llama.cpp's cells are the
        runtime's (`Runtime.state`)."""
        arrays = {**self.cells.state(), **self.scores.state(),
                  "recent_tokens": np.array(self.recent_tokens, dtype=np.int64)}
        return {"stats": asdict(self.stats), "reindex": self.reindex, "unseen": self.scores.unseen}, arrays

    def check_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Raise ValueError unless `state()`'s output fits this controller: every array's shape
        and type, the counters' names."""
        if meta.get("reindex") != self.reindex:
            raise ValueError("the saved stream was re-indexed and this model cannot be (or the reverse)")
        counters = meta.get("stats")
        if not isinstance(counters, dict) or not all(isinstance(v, (int, float)) for v in counters.values()):
            raise ValueError("the saved counters are not a record of numbers")
        indices = arrays.get("stream_indices")
        if indices is None or indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError("the saved stream indices are missing or not a 1-D integer array")
        n = indices.size
        if n > self.runtime.n_ctx or (n and (indices[0] < 0 or np.any(np.diff(indices) <= 0))):
            raise ValueError(f"the saved stream indices ({n}) are not increasing stream indices within the context")
        self.cells.check_state(arrays, n)
        # "unseen" is absent from files saved before generation skipped steps
        self.scores.check_state(arrays, n, meta.get("unseen", 0), self.cells.rows)
        recent = arrays.get("recent_tokens")
        if recent is not None and (recent.ndim != 1 or not np.issubdtype(recent.dtype, np.integer)):
            raise ValueError("the saved recent tokens are not a 1-D integer array")

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Take over a state that `check_state` accepted, once llama.cpp's cells are loaded."""
        self.cells.load_state(arrays)
        self.scores.load_state(arrays, meta.get("unseen", 0))
        names = {f.name for f in fields(CacheStats)}  # counters added since start at 0; unknown ones are a newer file's
        self._stats = CacheStats(**{k: v for k, v in meta["stats"].items() if k in names})
        self.recent_tokens = collections.deque(arrays.get("recent_tokens", np.zeros(0, np.int64)).tolist(),
                                               maxlen=self.view_tokens)
        self._captured_queries = -1  # the capture setting is not part of llama.cpp's state: set it again

    # -- decoding ---------------------------------------------------------------------------
    def feed(self, tokens, chunk: int, *, logits: str = "last", copies: np.ndarray | None = None) -> None:
        """Decode token ids (a list) or image embeddings (a float array [n, n_embd]) in chunks of
        `chunk`, evicting after each as needed. `copies`: the stream indices of the tokens that
        the first of them copy (a re-read), told to the listeners."""
        for i in range(0, len(tokens), chunk):
            self.decode(tokens[i:i + chunk], logits=logits, copies=None if copies is None else copies[i:i + chunk])

    def decode(self, tokens, *, logits: str = "last", generating: bool = False, causal: bool = True,
               layout: tuple[np.ndarray, int] | None = None, copies: np.ndarray | None = None) -> None:
        """Decode one chunk, then evict if the cache holds more than the budget.

        `tokens`: token ids, or a float array [n, n_embd] of input embeddings (an image's), which
        then take cells, scores and evictions like tokens and are counted as image tokens.
        `causal=False` decodes the chunk with full attention inside it (Gemma 3's images).
        `layout`: a whole M-RoPE image's position offsets [4, n] and the positions it spans
        (`ImageChunk.layout`, `ImageChunk.n_pos`): its cells share one position (module `layout`).
        While `generating` (one token at a time) the scores of successive steps add up and
        eviction waits until the cache reaches budget + generation_headroom. `copies`: as in `feed`.
        """
        n = len(tokens)
        is_image = isinstance(tokens, np.ndarray) and tokens.dtype.kind == "f"
        n_queries = self.policy.capture_queries(n)
        if generating and not self.reads_generation_step():
            n_queries = 0
        self._capture(n_queries)
        start = int(self.cells.advance.sum()) if self.reindex else self._stats.tokens_seen
        where = range(start, start + n) if layout is None else image_layout(layout[0], start)
        decode = self.runtime.decode_embeddings if is_image else self.runtime.decode
        t0 = time.perf_counter()
        if not causal:
            self.runtime.set_causal_attention(False)
        try:
            decode(tokens, where, logits=logits)
        finally:
            if not causal:
                self.runtime.set_causal_attention(True)
        t1 = time.perf_counter()
        self._stats.decode_s += t1 - t0

        n_old, first = self.n_cached, self._stats.tokens_seen
        new = np.arange(first, first + n, dtype=np.int64)
        self.cells.append(new, is_image, layout)
        decoded = self.listeners and Decoded(tokens, new, causal, layout, *(() if copies is None else (copies,)))
        for listener in self.listeners:
            listener(decoded)
        if self.view_tokens:
            self.recent_tokens.extend([-1] * n if is_image else tokens)
        self._stats.tokens_seen += n
        self._stats.image_tokens_seen += n if is_image else 0
        self._stats.peak_cells = max(self._stats.peak_cells, self.n_cached)
        self.scores.added(n)
        if n_queries:
            self._observe(queries_seen(n_old, n, n_queries, causal),
                          accumulate=self.policy.accumulates_attention or generating)
            self._stats.capture_s += time.perf_counter() - t1
        elif self.policy.reads_attention:
            self.scores.skipped(n)

        limit = self.policy.budget + (self.generation_headroom if generating else 0)
        if self.n_cached > limit or (generating and self.n_cached >= limit):
            self.evict()

    def _capture(self, n_queries: int) -> None:
        """Set the runtime to capture the last `n_queries` queries of the next decode (once)."""
        if n_queries != self._captured_queries:
            self.runtime.capture_scores(n_queries)
            self._captured_queries = n_queries

    def probe(self, tokens: list[int], query: list[int]) -> np.ndarray:
        """The attention `query`'s tokens give each of `tokens` when both are decoded after the
        cache (summed over layers, heads and queries; float64 [len(tokens)]); the cache is put back
        as it was. The caller leaves room: len(tokens) + len(query) + 1 free cells."""
        runtime, step = self.runtime, self.runtime.n_batch
        meta, saved = runtime.state()
        head, tail = tokens + query[:-step], query[-step:]
        first = runtime.pos_max() + 1
        try:
            self._capture(0)
            for i in range(0, len(head), step):
                runtime.decode(head[i:i + step], logits="none")
            self._capture(len(tail))
            runtime.decode(tail, logits="none")
            captured = runtime.read_scores()
        finally:
            runtime.load_state(meta, saved)
            self._captured_queries = -1  # the state load does not restore it
        per_position = dict(zip(captured.positions.tolist(), captured.scores.sum(axis=0, dtype=np.float64).tolist()))
        return np.array([per_position.get(first + k, 0.0) for k in range(len(tokens))])

    def reads_generation_step(self) -> bool:
        """Whether the policy reads the attention of the generation step about to be decoded: one of
        the last `capture_queries(generation_headroom)` steps before the planned eviction (when the
        cache reaches budget + generation_headroom), or a step that would otherwise leave
        `budget - sinks` cells unseen."""
        if not self.policy.reads_attention:
            return False
        steps_left = self.policy.budget + self.generation_headroom - (self.n_cached + 1)
        return (steps_left < self.policy.capture_queries(self.generation_headroom)
                or self.scores.unseen + 1 >= self.policy.budget - self.policy.sinks)

    def _observe(self, visibility: np.ndarray, *, accumulate: bool) -> None:
        """Read the scores of the last decode; add them (and their visibility) to those since the
        last eviction, or replace those."""
        captured = self.runtime.read_scores()
        if captured.positions.size != self.n_cached or not np.array_equal(captured.positions, self.positions()):
            raise RuntimeError(f"llama.cpp holds {captured.positions.size} cells for the sequence, the controller "
                               f"{self.n_cached}: the cache was edited behind the controller's back")
        self.scores.observe(captured.scores, visibility, accumulate=accumulate)

    # -- eviction ---------------------------------------------------------------------------
    def make_room(self, n: int) -> int:
        """Evict with the policy at budget - n, so that `n` cells can be decoded without another
        eviction; returns the cells removed."""
        policy = self.policy.with_budget(self.policy.budget - n)
        if policy.reads_attention and self.scores.attention is None and self.n_cached > policy.budget:
            self.scores.cover(self.n_cached)  # nothing decoded since the last eviction: the carried scores decide
        return self.evict(policy)

    def evict(self, policy: Policy | None = None) -> int:
        """Apply the policy (or `policy`, the same at another budget) once; returns the number of
        cells removed."""
        policy = policy or self.policy
        n_before = self.n_cached
        if n_before <= policy.budget:
            return 0
        t0 = time.perf_counter()
        observation = Observation(self.cells.stream_indices)
        if policy.reads_attention:
            if self.scores.unseen:
                policy = replace(policy, recent=max(policy.recent, self.scores.unseen))
                self.scores.cover(n_before)
            observation = self.scores.observation(self.cells.observed)
        selection = self.cells.settle(policy.select(observation), policy.budget)
        images_before = self.cells.image_stream_indices().size
        self.cells.apply(selection, self.runtime, self.reindex)
        self.scores.evicted(selection.carried)
        self._stats.image_cells_evicted += images_before - self.cells.image_stream_indices().size
        self._stats.cells_evicted += n_before - self.n_cached
        self._stats.evictions += 1
        self._stats.evict_s += time.perf_counter() - t0
        return n_before - self.n_cached
