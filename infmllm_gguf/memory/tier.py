"""The memory tier: what the policy evicts can come back when a prompt needs it.

Every text token the stream decodes is kept, as its token id and stream index, in host memory
(`TokenStore`, 12 bytes a token, up to `cap` tokens). At each new prompt (`StreamSession.generate`
with a prompt, a user turn) the prompt ranks the memory's blocks (`ranking`), and the best that
the cache no longer holds are *re-read*: decoded again, in stream order, right before the prompt,
inside the budget. Room for them and the prompt is made first by the policy itself, evicting at a
smaller budget (`CacheController.make_room`), so the answer reads them with nothing else evicted.
A re-read block is a copy: it takes new stream indices (counted in `tokens_seen`), is not stored
again, and competes for the cache like any other cells afterwards.

Re-reading computes a block's keys and values again in a new context (the cells before it in the
cache), not the ones it had in the stream: it costs a prefill of the recalled tokens (at most
`reserve`), and llama.cpp's cells need no export. Images are not kept (their tokens are embeddings,
not ids): a recalled passage comes back as text only.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .ranking import block_starts, bm25, choose

if TYPE_CHECKING:
    from ..cache import CacheController

RANKINGS = ("lexical", "attention")


@dataclass(frozen=True)
class MemoryConfig:
    """How the memory ranks and re-reads. `reserve`: cells of the budget that re-read blocks may
    take at one prompt (0: a quarter of the budget); `window`: tokens a block holds, blocks start
    every half window (0: 64, or the reserve if smaller); `cap`: tokens kept at most (the oldest go
    first beyond it)."""
    ranking: str = "lexical"
    reserve: int = 0
    window: int = 0
    cap: int = 4_000_000

    def __post_init__(self) -> None:
        if self.ranking not in RANKINGS:
            raise ValueError(f"unknown memory ranking {self.ranking!r}: pass --memory-ranking {' or '.join(RANKINGS)}")
        if self.window == 1 or self.window < 0:
            raise ValueError(f"a memory block must hold at least 2 tokens (got window {self.window})")
        if self.reserve < 0 or self.cap < max(self.window, 2):
            raise ValueError(f"the memory reserve ({self.reserve}) must be >= 0 and its cap ({self.cap}) at least a "
                             f"block ({self.window} tokens)")

    def config(self) -> dict:
        return asdict(self)

    def reserve_for(self, budget: int) -> int:
        return self.reserve or budget // 4


@dataclass
class MemoryStats:
    tokens_stored: int = 0      # held now
    tokens_dropped: int = 0     # the oldest, beyond the cap
    prompts: int = 0            # prompts that ranked the memory
    tokens_recalled: int = 0    # re-read, all prompts together
    spans_recalled: int = 0
    recall_s: float = 0.0       # ranking and re-reading, all prompts together
    last_recalled: list = field(default_factory=list)  # [first stream index, last + 1] of each span at the last prompt
    last_recall_s: float = 0.0

    @property
    def host_bytes(self) -> int:
        return self.tokens_stored * TokenStore.BYTES_PER_TOKEN


class TokenStore:
    """The stream's text tokens in order: ids and stream indices, appended in pieces and joined
    when read, the oldest dropped beyond `cap`. `copies` maps the stream indices of re-read tokens
    to the stored tokens they copy, so a block the cache holds as a copy is not re-read again."""

    BYTES_PER_TOKEN = 12  # int32 id + int64 stream index

    def __init__(self, cap: int):
        self.cap = cap
        self.dropped = 0
        self._pieces: list[tuple[np.ndarray, np.ndarray]] = []
        self.copy_indices = np.zeros(0, dtype=np.int64)  # stream indices of re-read tokens
        self.copy_of = np.zeros(0, dtype=np.int64)       # the stream index each one copies

    def __len__(self) -> int:
        return sum(ids.size for ids, _ in self._pieces)

    def append(self, ids: Sequence[int], indices: np.ndarray) -> None:
        self._pieces.append((np.asarray(ids, dtype=np.int32), np.asarray(indices, dtype=np.int64)))
        if len(self._pieces) > 64:
            self.arrays()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32[n], stream indices int64[n]) of every stored token, oldest first."""
        if len(self._pieces) != 1:
            ids = np.concatenate([p[0] for p in self._pieces]) if self._pieces else np.zeros(0, np.int32)
            indices = np.concatenate([p[1] for p in self._pieces]) if self._pieces else np.zeros(0, np.int64)
            self._pieces = [(ids, indices)]
        ids, indices = self._pieces[0]
        if ids.size > self.cap:
            self.dropped += ids.size - self.cap
            ids, indices = ids[-self.cap:].copy(), indices[-self.cap:].copy()
            self._pieces = [(ids, indices)]
        return ids, indices

    def add_copies(self, copy_indices: np.ndarray, originals: np.ndarray) -> None:
        self.copy_indices = np.concatenate((self.copy_indices, copy_indices))
        self.copy_of = np.concatenate((self.copy_of, originals))

    def held(self, indices: np.ndarray, cached: np.ndarray) -> np.ndarray:
        """bool[n]: whether the cache holds each stored token (`indices`), itself or a copy of it.
        Copies no longer cached are forgotten."""
        live = np.isin(self.copy_indices, cached)
        self.copy_indices, self.copy_of = self.copy_indices[live], self.copy_of[live]
        return np.isin(indices, cached) | np.isin(indices, self.copy_of)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        ids, indices = self.arrays()
        return {"dropped": self.dropped}, {"ids": ids, "indices": indices, "copy_indices": self.copy_indices,
                                          "copy_of": self.copy_of}

    @staticmethod
    def check_state(meta: dict, arrays: dict[str, np.ndarray]) -> None:
        ids, indices = arrays.get("ids"), arrays.get("indices")
        if ids is None or indices is None or ids.ndim != 1 or ids.shape != indices.shape:
            raise ValueError("the saved memory's token ids and stream indices are missing or do not match")
        if indices.size and np.any(np.diff(indices) <= 0):
            raise ValueError("the saved memory's stream indices are not increasing")
        copies, of = arrays.get("copy_indices"), arrays.get("copy_of")
        if copies is None or of is None or copies.shape != of.shape:
            raise ValueError("the saved memory's copies are missing or do not match")
        if not isinstance(meta.get("dropped"), int):
            raise ValueError("the saved memory lacks its count of dropped tokens")

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self._pieces = [(arrays["ids"].astype(np.int32), arrays["indices"].astype(np.int64))]
        self.copy_indices = arrays["copy_indices"].astype(np.int64)
        self.copy_of = arrays["copy_of"].astype(np.int64)
        self.dropped = meta["dropped"]


class Memory:
    """The memory of one session's stream (see the module's docstring). The controller calls
    `record` at each decode; the session calls `recall` before each prompt."""

    def __init__(self, config: MemoryConfig, budget: int):
        self.config = config
        self.reserve = config.reserve_for(budget)
        self.window = config.window or min(64, self.reserve)
        if not 2 <= self.window <= self.reserve <= budget // 2:
            raise ValueError(f"the memory reserve ({self.reserve} cells) must hold a block ({self.window} tokens) "
                             f"and at most half the budget ({budget // 2}): pass another --memory-reserve, a larger "
                             "--budget, or --memory off")
        self.store = TokenStore(config.cap)
        self._stats = MemoryStats()
        self._rereading: np.ndarray | None = None  # the stream indices being re-read now

    def reset(self) -> None:
        self.store = TokenStore(self.config.cap)
        self._stats = MemoryStats()

    @property
    def stats(self) -> MemoryStats:
        self.store.arrays()  # applies the cap
        self._stats.tokens_stored = len(self.store)
        self._stats.tokens_dropped = self.store.dropped
        return self._stats

    # -- recording --------------------------------------------------------------------------
    def record(self, ids: Sequence[int], indices: np.ndarray) -> None:
        """Text tokens just decoded, with their stream indices; a re-read block is kept as copies."""
        if self._rereading is not None:
            n = len(indices)
            self.store.add_copies(np.asarray(indices, dtype=np.int64), self._rereading[:n])
            self._rereading = self._rereading[n:]
        else:
            self.store.append(ids, indices)

    # -- recall -----------------------------------------------------------------------------
    def rank(self, cache: "CacheController", query: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The blocks worth re-reading for `query`, best first: (order, block starts, held mask).
        A block qualifies when the cache holds less than half of it and it shares at least two
        distinct tokens with the query (one if the query has one), with a positive score."""
        ids, indices = self.store.arrays()
        window = self.window
        starts = block_starts(ids.size, window)
        held = self.store.held(indices, np.unique(cache.held_by_layer))
        count = np.concatenate(([0], np.cumsum(held)))
        ends = np.minimum(starts + window, ids.size)
        mostly_gone = (count[ends] - count[starts]) * 2 < ends - starts
        score, matched = bm25(ids, starts, window, np.asarray(query))
        need = min(2, np.unique(np.asarray(query)).size)
        eligible = np.flatnonzero(mostly_gone & (matched >= need) & (score > 0))
        order = eligible[np.argsort(-score[eligible], kind="stable")]
        return order, starts, held

    def recall(self, cache: "CacheController", query: Sequence[int], n_prompt: int, chunk: int) -> int:
        """Re-read the blocks `query` ranks best into the cache, with room left for a prompt of
        `n_prompt` tokens after them; returns the number of tokens re-read."""
        t0 = time.perf_counter()
        self._stats.prompts += 1
        self._stats.last_recalled = []
        ids, indices = self.store.arrays()
        room = min(self.reserve, cache.room_for_recall(n_prompt))
        if room < 1 or ids.size == 0:
            self._stats.last_recall_s = time.perf_counter() - t0
            return 0
        order, starts, _ = self.rank(cache, query)
        if order.size and self.config.ranking == "attention":
            order = self._rerank_by_attention(cache, order, starts, ids, query, n_prompt, chunk)
        spans = choose(order, starts, self.window, ids.size, room)
        n = sum(b - a for a, b in spans)
        if n:
            cache.make_room(n + n_prompt)
            for a, b in spans:
                first = cache.stats.tokens_seen
                self._rereading = indices[a:b]
                try:
                    cache.feed(ids[a:b].tolist(), chunk)
                finally:
                    self._rereading = None
                self._stats.last_recalled.append([first, first + b - a])
            self._stats.tokens_recalled += n
            self._stats.spans_recalled += len(spans)
        self._stats.last_recall_s = time.perf_counter() - t0
        self._stats.recall_s += self._stats.last_recall_s
        return n

    def _rerank_by_attention(self, cache: "CacheController", order: np.ndarray, starts: np.ndarray,
                             ids: np.ndarray, query: Sequence[int], n_prompt: int, chunk: int) -> np.ndarray:
        """The lexical shortlist that fits the context's free cells, re-read with the query after it
        and ordered by the attention the query's tokens give each block (its cells' scores summed
        over layers, heads and queries); the cache is put back as it was. Blocks beyond the
        shortlist keep their lexical order after it."""
        runtime = cache.runtime
        window = self.window
        free = runtime.n_ctx - runtime.n_cached() - len(query)
        spans = choose(order, starts, window, ids.size, free)
        if not spans:
            return order
        probe = np.concatenate([np.arange(a, b) for a, b in spans])  # stored token numbers, in order
        meta, saved = runtime.state()
        try:
            first = runtime.pos_max() + 1
            runtime.capture_scores(0)
            tokens = ids[probe].tolist()
            for i in range(0, len(tokens), runtime.n_batch):
                runtime.decode(tokens[i:i + runtime.n_batch], logits="none")
            query = list(query)
            head, tail = query[:-runtime.n_batch], query[-runtime.n_batch:]
            for i in range(0, len(head), runtime.n_batch):
                runtime.decode(head[i:i + runtime.n_batch], logits="none")
            runtime.capture_scores(len(tail))
            runtime.decode(tail, logits="none")
            captured = runtime.read_scores()
        finally:
            runtime.load_state(meta, saved)
            cache.forget_capture_setting()
        per_position = dict(zip(captured.positions.tolist(), captured.scores.sum(axis=0, dtype=np.float64).tolist()))
        attention = np.zeros(ids.size)
        attention[probe] = [per_position.get(first + k, 0.0) for k in range(probe.size)]
        ends = np.minimum(starts + window, ids.size)
        probed = np.zeros(ids.size, dtype=bool)
        probed[probe] = True
        whole = np.array([probed[starts[k]:ends[k]].all() for k in order])
        shortlist, rest = order[whole], order[~whole]
        count = np.concatenate(([0], np.cumsum(attention)))
        mass = count[ends[shortlist]] - count[starts[shortlist]]
        return np.concatenate((shortlist[np.argsort(-mass, kind="stable")], rest))

    # -- state ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta, arrays = self.store.state()
        stats = asdict(self.stats)
        return {"store": meta, "stats": stats, "config": self.config.config()}, arrays

    def check_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        TokenStore.check_state(meta.get("store", {}), arrays)
        if meta.get("config") != self.config.config():
            raise ValueError(f"the saved memory ran with {meta.get('config')}, this session's with "
                             f"{self.config.config()}")

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.store.load_state(meta["store"], arrays)
        self._stats = MemoryStats(**meta["stats"])
