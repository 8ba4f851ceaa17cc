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
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .layout import image_layout, keep_images_whole, positions
from .policies import Full, Observation, Policy, Selection
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


def queries_seen(n_old: int, chunk: int, n_queries: int, causal: bool) -> np.ndarray:
    """How many of a chunk's `n_queries` captured queries (its last ones) can attend to each cell:
    the `n_old` cells cached before the chunk, then the chunk's `chunk` cells (float64). A causal
    query sees the cells up to itself; a non-causal chunk (an image read both ways) sees all."""
    new = np.minimum(n_queries, chunk - np.arange(chunk)) if causal else np.full(chunk, n_queries)
    return np.concatenate((np.full(n_old, n_queries), new)).astype(np.float64)


class CacheController:
    """Owns the stream state of one `Runtime` sequence under `policy`.

    `stream_indices[i]` is the stream index (token number in the stream) of the i-th cached cell;
    with re-indexing its llama.cpp position is the sum of the `advance` of the cells before it (`i`
    when every cell takes one position; an M-RoPE image's cells share one, `layout`), else the
    stream index itself. `is_image[i]` says whether that cell holds an image embedding rather than
    a text token. Since the last
    eviction, `attention` and `visibility` hold what the captured queries gave each cell and how
    many of them could see it; `carried` is the score the policy carried from that eviction.

    While generating, a step is captured only if the policy will read it (`reads_generation_step`):
    eviction comes every `generation_headroom` steps, and a policy reads the last
    `capture_queries(generation_headroom)` of them, as it reads the last queries of a chunk. The
    steps in between are not observed at all: neither their attention nor their visibility counts.
    The cells decoded after the last captured step (`unseen`) are kept at an eviction that comes
    before the planned one (a generation that stops early), as the recent cells are: no query
    judged them yet. The schedule keeps them fewer than `budget - sinks`.

    A policy that decides per layer (`granularity` "layer") keeps each layer's own tokens:
    `layer_indices[l, i]` is the stream index of the token that layer l holds in cell i, and
    eviction compacts each layer's cache on its own (`Runtime.compact`). Cell i is then position
    i in every layer; `stream_indices[i]` is the newest token any layer holds there, and
    `is_image[l, i]` flags layer l's cell i; the image counters count image tokens that some layer
    holds. It needs a plain (not sliding-window) cache whose positions can be shifted: the
    policy's granularity "auto" settles on "layer" there and on "token" elsewhere.
    With `view_tokens` > 0, `recent_tokens` keeps the token ids of the last `view_tokens` tokens of the
    stream, evicted or not (-1 for an image embedding): a view for a user interface, bounded.
    """

    def __init__(self, runtime: Runtime, policy: Policy, *, generation_headroom: int = 32, view_tokens: int = 0,
                 shared_image_positions: bool = False):
        self.runtime = runtime
        self.policy = policy
        self.generation_headroom = generation_headroom
        self.view_tokens = view_tokens
        self.memory = None  # a `Memory` that records each decoded text token (the session sets it)
        if not runtime.kv_layers:
            raise ValueError(f"{runtime.model.name} ({runtime.model.architecture}) is a recurrent model: it has no KV "
                             "cache to bound, its state is of fixed size already")
        self.reindex = runtime.can_shift()
        if shared_image_positions and not self.reindex:
            raise ValueError(f"{runtime.model.name}: its images' cells share positions (M-RoPE) and llama.cpp cannot "
                             "shift them: images are not supported for this model")
        # an M-RoPE image's cells share one position, which a per-layer compaction cannot tell apart
        compactable = runtime.can_compact() and not shared_image_positions
        granularity = getattr(policy, "granularity", "token")
        if granularity == "auto":  # settled here, so that records and saves name what ran
            granularity = "layer" if compactable else "token"
            self.policy = policy = replace(policy, granularity=granularity)
        self.per_layer = granularity == "layer"
        if self.per_layer and not compactable:
            raise ValueError(f"{runtime.model.name}: per-layer eviction (--granularity layer) compacts a plain or "
                             "hybrid KV cache with shiftable positions; this model has sliding-window layers, MLA's "
                             "compressed keys or positions llama.cpp cannot shift: use --granularity token (or auto)")
        if not self.reindex:
            warnings.warn(f"{runtime.model.name}: llama.cpp cannot shift this model's positions ({runtime.model.architecture}); "
                          "cached tokens keep their original positions, which grow with the stream", stacklevel=3)
        self.reset_state()

    def reset_state(self) -> None:
        self.stream_indices = np.zeros(0, dtype=np.int64)
        self.layer_indices = np.zeros(self._layer_rows + (0,), dtype=np.int64) if self.per_layer else None
        self.is_image = np.zeros(self._layer_rows + (0,), dtype=bool)
        self.advance = np.zeros(0, dtype=np.int64)  # positions each cell moves the next one on (`layout`)
        self._stats = CacheStats()
        self.attention: np.ndarray | None = None   # float64 [n_layer, n]
        self.visibility: np.ndarray | None = None  # float64 [n]
        self.carried: np.ndarray | None = None     # float64 [n] ([n_layer, n] per layer)
        self.recent_tokens: collections.deque[int] = collections.deque(maxlen=self.view_tokens)
        self.unseen = 0  # newest cells that no captured query saw (uncaptured generation steps)
        self._captured_queries = -1  # what the runtime is set to capture; -1: not set since a load

    @property
    def _layer_rows(self) -> tuple[int, ...]:
        """The leading shape of per-cell arrays that differ by layer: (n_layer,) per layer, else ()."""
        return (len(self.runtime.kv_layers),) if self.per_layer else ()

    @property
    def held_by_layer(self) -> np.ndarray:
        """The stream indices each layer holds: [n_layer, n] per layer, one row [1, n] when one
        decision serves every layer; `is_image` (made 2-D) flags the same cells."""
        return self.layer_indices if self.per_layer else self.stream_indices[None]

    def image_stream_indices(self) -> np.ndarray:
        """The stream indices of the cached image tokens, ascending (per layer: held by some layer)."""
        return np.unique(self.held_by_layer[np.atleast_2d(self.is_image)])

    def reset(self) -> None:
        self.runtime.clear()
        self.reset_state()

    @property
    def stats(self) -> CacheStats:
        """A copy of the counters, the cached cells counted from the cache state."""
        return replace(self._stats, cells_cached=int(self.stream_indices.size),
                       image_cells_cached=int(self.image_stream_indices().size))

    @property
    def n_cached(self) -> int:
        return int(self.stream_indices.size)

    def positions(self) -> np.ndarray:
        """The llama.cpp positions of the cached cells, in stream order."""
        return positions(self.advance) if self.reindex else self.stream_indices.copy()

    # -- state ------------------------------------------------------------------------------
    _ARRAYS = ("stream_indices", "layer_indices", "is_image", "advance", "attention", "visibility", "carried")

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The controller's state for a save: counters and arrays. llama.cpp's cells are the
        runtime's (`Runtime.state`)."""
        arrays = {name: getattr(self, name) for name in self._ARRAYS if getattr(self, name) is not None}
        arrays["recent_tokens"] = np.array(self.recent_tokens, dtype=np.int64)
        return {"stats": asdict(self.stats), "reindex": self.reindex, "unseen": self.unseen}, arrays

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
        unseen = meta.get("unseen", 0)  # absent from files saved before generation skipped steps
        if not isinstance(unseen, int) or not 0 <= unseen <= n:
            raise ValueError(f"the saved count of unseen cells ({unseen!r}) is not in [0, {n}]")
        n_layer, seen = len(self.runtime.kv_layers), n - unseen
        layer_indices = arrays.get("layer_indices")
        if self.per_layer != (layer_indices is not None):
            raise ValueError("the saved stream was evicted per layer and this policy decides per token (or the reverse)")
        if layer_indices is not None and (layer_indices.shape != (n_layer, n) or np.any(np.diff(layer_indices) <= 0)):
            raise ValueError(f"the saved per-layer stream indices are not {n_layer} increasing rows of {n}")
        carried = (n_layer, n) if self.per_layer and arrays.get("carried") is not None \
            and arrays["carried"].ndim == 2 else (n,)
        if self.per_layer and arrays.get("is_image") is not None and arrays["is_image"].shape == (n,):
            arrays["is_image"] = np.broadcast_to(arrays["is_image"], (n_layer, n))  # saved before per-layer images
        for name, shape in (("is_image", self._layer_rows + (n,)), ("attention", (n_layer, seen)), ("visibility", (seen,)),
                            ("carried", carried)):
            value = arrays.get(name)
            if name == "is_image" and value is None:
                raise ValueError("the saved image flags are missing")
            if value is not None and value.shape != shape:
                raise ValueError(f"the saved {name} has shape {value.shape}, the saved cells need {shape}")
        if (arrays.get("attention") is None) != (arrays.get("visibility") is None):
            raise ValueError("the saved attention and visibility come together or not at all")
        advance = arrays.get("advance")  # absent from files saved before M-RoPE images: one position a cell
        if advance is not None and (advance.shape != (n,) or np.any(advance < 0)):
            raise ValueError(f"the saved advances are not {n} non-negative numbers")
        recent = arrays.get("recent_tokens")
        if recent is not None and (recent.ndim != 1 or not np.issubdtype(recent.dtype, np.integer)):
            raise ValueError("the saved recent tokens are not a 1-D integer array")

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Take over a state that `check_state` accepted, once llama.cpp's cells are loaded."""
        self.stream_indices = arrays["stream_indices"].astype(np.int64)
        self.layer_indices = arrays["layer_indices"].astype(np.int64) if self.per_layer else None
        self.is_image = arrays["is_image"].astype(bool)
        self.advance = arrays.get("advance", np.ones(self.stream_indices.size)).astype(np.int64)
        for name in ("attention", "visibility", "carried"):
            value = arrays.get(name)
            setattr(self, name, None if value is None else value.astype(np.float64))
        names = {f.name for f in fields(CacheStats)}  # counters added since start at 0; unknown ones are a newer file's
        self._stats = CacheStats(**{k: v for k, v in meta["stats"].items() if k in names})
        self.unseen = meta.get("unseen", 0)
        self.recent_tokens = collections.deque(arrays.get("recent_tokens", np.zeros(0, np.int64)).tolist(),
                                               maxlen=self.view_tokens)
        self._captured_queries = -1  # the capture setting is not part of llama.cpp's state: set it again

    # -- decoding ---------------------------------------------------------------------------
    def feed(self, tokens, chunk: int, *, logits: str = "last") -> None:
        """Decode token ids (a list) or image embeddings (a float array [n, n_embd]) in chunks of
        `chunk`, evicting after each as needed."""
        for i in range(0, len(tokens), chunk):
            self.decode(tokens[i:i + chunk], logits=logits)

    def decode(self, tokens, *, logits: str = "last", generating: bool = False, causal: bool = True,
               layout: tuple[np.ndarray, int] | None = None) -> None:
        """Decode one chunk, then evict if the cache holds more than the budget.

        `tokens`: token ids, or a float array [n, n_embd] of input embeddings (an image's), which
        then take cells, scores and evictions like tokens and are counted as image tokens.
        `causal=False` decodes the chunk with full attention inside it (Gemma 3's images).
        `layout`: a whole M-RoPE image's position offsets [4, n] and the positions it spans
        (`ImageChunk.layout`, `ImageChunk.n_pos`): its cells share one position (module `layout`).
        While `generating` (one token at a time) the scores of successive steps add up and
        eviction waits until the cache reaches budget + generation_headroom.
        """
        n = len(tokens)
        is_image = isinstance(tokens, np.ndarray) and tokens.dtype.kind == "f"
        n_queries = self.policy.capture_queries(n)
        if generating and not self.reads_generation_step():
            n_queries = 0
        if n_queries != self._captured_queries:
            self.runtime.capture_scores(n_queries)
            self._captured_queries = n_queries
        start = int(self.advance.sum()) if self.reindex else self._stats.tokens_seen
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

        n_old, first = self.stream_indices.size, self._stats.tokens_seen
        new = np.arange(first, first + n, dtype=np.int64)
        self.stream_indices = np.concatenate((self.stream_indices, new))
        if self.per_layer:
            self.layer_indices = np.concatenate((self.layer_indices, np.broadcast_to(new, (len(self.layer_indices), n))),
                                                axis=1)
        self.is_image = np.concatenate((self.is_image, np.full(self.is_image.shape[:-1] + (n,), is_image)), axis=-1)
        advance = np.ones(n, dtype=np.int64)
        if layout is not None:
            advance[:-1], advance[-1] = 0, layout[1]
        self.advance = np.concatenate((self.advance, advance))
        if self.memory is not None:
            self.memory.record(tokens, new, causal=causal, layout=layout)
        if self.view_tokens:
            self.recent_tokens.extend([-1] * n if is_image else tokens)
        self._stats.tokens_seen += n
        self._stats.image_tokens_seen += n if is_image else 0
        self._stats.peak_cells = max(self._stats.peak_cells, int(self.stream_indices.size))
        if self.carried is not None:
            self.carried = np.concatenate((self.carried, np.zeros(self.carried.shape[:-1] + (n,))), axis=-1)
        if n_queries:
            self._observe(queries_seen(n_old, n, n_queries, causal),
                          accumulate=self.policy.accumulates_attention or generating)
            self._stats.capture_s += time.perf_counter() - t1
            self.unseen = 0
        elif self.policy.reads_attention:
            self.unseen += n

        limit = self.policy.budget + (self.generation_headroom if generating else 0)
        if self.stream_indices.size > limit or (generating and self.stream_indices.size >= limit):
            self.evict()

    def forget_capture_setting(self) -> None:
        """The runtime's capture setting was changed behind the controller (the memory's probe): set
        it again at the next decode."""
        self._captured_queries = -1

    def reads_generation_step(self) -> bool:
        """Whether the policy reads the attention of the generation step about to be decoded: one of
        the last `capture_queries(generation_headroom)` steps before the planned eviction (when the
        cache reaches budget + generation_headroom), or a step that would otherwise leave
        `budget - sinks` cells unseen."""
        if not self.policy.reads_attention:
            return False
        steps_left = self.policy.budget + self.generation_headroom - (self.stream_indices.size + 1)
        return (steps_left < self.policy.capture_queries(self.generation_headroom)
                or self.unseen + 1 >= self.policy.budget - self.policy.sinks)

    def _observe(self, visibility: np.ndarray, *, accumulate: bool) -> None:
        """Read the scores of the last decode; add them (and their visibility) to those since the
        last eviction, or replace those."""
        captured = self.runtime.read_scores()
        if captured.positions.size != self.stream_indices.size or \
                not np.array_equal(captured.positions, self.positions()):
            raise RuntimeError(f"llama.cpp holds {captured.positions.size} cells for the sequence, the controller "
                               f"{self.stream_indices.size}: the cache was edited behind the controller's back")
        attention = captured.scores.astype(np.float64)
        if accumulate and self.attention is not None:
            n_before = self.attention.shape[1]
            attention[:, :n_before] += self.attention
            visibility[:n_before] += self.visibility
        self.attention, self.visibility = attention, visibility

    # -- eviction ---------------------------------------------------------------------------
    def _compact(self, selection: Selection, t0: float) -> int:
        """Apply a per-layer selection: each layer keeps its own `budget` cells (`Runtime.compact`)."""
        pos = self.positions()
        self.runtime.compact(np.stack([pos[row] for row in selection.keep]))
        n_removed = self.stream_indices.size - self.policy.budget
        images_before = self.image_stream_indices().size
        self.layer_indices = np.stack([row[keep] for row, keep in zip(self.layer_indices, selection.keep)])
        self.stream_indices = self.layer_indices.max(axis=0)
        self.is_image = np.stack([row[keep] for row, keep in zip(self.is_image, selection.keep)])
        self.advance = np.ones(self.policy.budget, dtype=np.int64)  # per layer: text only, one position a cell
        self._stats.image_cells_evicted += images_before - self.image_stream_indices().size
        return self._evicted(selection, n_removed, t0)

    def _evicted(self, selection: Selection, n_removed: int, t0: float) -> int:
        """What every eviction ends with: the carried scores, no observation pending, the counters."""
        self.carried = selection.carried
        self.attention = self.visibility = None
        self.unseen = 0
        self._stats.cells_evicted += n_removed
        self._stats.evictions += 1
        self._stats.evict_s += time.perf_counter() - t0
        return n_removed

    def _cover_unseen(self) -> None:
        """Give the cells no captured query saw zero attention and a visibility of one, so that the
        observation covers every cell; they are kept as recent cells, so these values only stand in.
        With no capture since the last eviction, every cell gets them, and the policy's tie rule
        (its bias toward newer cells) decides alone."""
        n = self.stream_indices.size
        seen = 0 if self.attention is None else self.attention.shape[1]
        attention = np.zeros((len(self.runtime.kv_layers) if self.attention is None else self.attention.shape[0], n))
        visibility = np.ones(n)
        if seen:
            attention[:, :seen], visibility[:seen] = self.attention, self.visibility
        self.attention, self.visibility = attention, visibility

    def room_for_recall(self, n_prompt: int) -> int:
        """The most cells that re-read memory may take before a prompt of `n_prompt` tokens, all
        within the budget: what is left when the policy keeps its fewest cells (its sinks and one
        more). 0 for a policy that never evicts."""
        if isinstance(self.policy, Full):
            return 0
        floor = self.policy.sinks + getattr(self.policy, "n_keep", 0) + 1
        return max(self.policy.budget - n_prompt - floor, 0)

    def make_room(self, n: int) -> int:
        """Evict with the policy at budget - n, so that `n` cells can be decoded without another
        eviction; returns the cells removed."""
        policy = self.policy
        self.policy = policy.with_budget(policy.budget - n)
        if policy.reads_attention and self.attention is None and self.stream_indices.size > self.policy.budget:
            self._cover_unseen()  # nothing decoded since the last eviction: the carried scores decide
        try:
            return self.evict()
        finally:
            self.policy = policy

    def evict(self) -> int:
        """Apply the policy once; returns the number of cells removed."""
        if self.stream_indices.size <= self.policy.budget:
            return 0
        t0 = time.perf_counter()
        policy, observation = self.policy, Observation(self.stream_indices)
        if policy.reads_attention:
            if self.unseen:
                policy = replace(policy, recent=max(policy.recent, self.unseen))
                self._cover_unseen()
            if self.attention is None or self.attention.shape[1] != self.stream_indices.size:
                raise RuntimeError("no attention scores cover the newest cells; decode a chunk before evicting")
            observation = Observation(self.layer_indices if self.per_layer else self.stream_indices, self.attention,
                                      self.visibility, self.carried)
        selection = policy.select(observation)
        if self.per_layer:
            return self._compact(selection, t0)
        selection = self._keep_images_whole(selection)
        keep = selection.keep
        pos = self.positions()
        for a, b in reversed(runs(~keep)):  # removing from the end keeps earlier positions valid
            self.runtime.remove(int(pos[a]), int(pos[b - 1]) + 1)
        if self.reindex:
            moved = positions(self.advance[keep]) - pos[keep]  # each kept cell's new position - its old one
            first = np.cumsum(keep) - 1  # the index among the kept cells
            for a, b in runs(keep):
                if moved[first[a]]:
                    self.runtime.shift(int(pos[a]), int(pos[b - 1]) + 1, int(moved[first[a]]))
        n_removed = int(np.count_nonzero(~keep))
        self.stream_indices = self.stream_indices[keep]
        self.advance = self.advance[keep]
        self._stats.image_cells_evicted += int(np.count_nonzero(self.is_image[~keep]))
        self.is_image = self.is_image[keep]
        return self._evicted(selection, n_removed, t0)

    def _keep_images_whole(self, selection: Selection) -> Selection:
        """`selection` with every M-RoPE image kept or dropped whole (llama.cpp removes cells by
        position, which an image's cells share): `layout.keep_images_whole`; a cell it adds carries 0."""
        if np.all(self.advance == 1):
            return selection
        keep = keep_images_whole(selection.keep, self.advance, self.policy.budget)
        carried = selection.carried
        if carried is not None:
            full = np.zeros(keep.size)
            full[selection.keep] = carried
            carried = full[keep]
        return replace(selection, keep=keep, carried=carried)
