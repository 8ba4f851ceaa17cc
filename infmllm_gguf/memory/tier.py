"""The memory tier: what the policy evicts can come back when a prompt needs it.

Every text token the stream decodes is kept, as its token id and stream index, in host memory
(`TokenStore`, 12 bytes a token, up to `cap` tokens), and with the default `hidden` ranking a
vector of the model's own layer output (`hidden`, 66 bytes a token, up to `vector_cap`). At each
new prompt (`StreamSession.generate` with a prompt, a user turn) the prompt ranks the memory's
blocks (`ranking`, `hidden`, `embedding`), and the best that the cache no longer holds are
*re-read*: decoded again, in stream order, right before the prompt, inside the budget. Room for
them and the prompt is made first by the policy itself, evicting at a smaller budget
(`CacheController.make_room`), so the answer reads them with nothing else evicted.
A re-read block is a copy: it takes new stream indices (counted in `tokens_seen`), is not stored
again, and competes for the cache like any other cells afterwards.

Re-reading computes a block's keys and values again in a new context (the cells before it in the
cache), not the ones it had in the stream: it costs a prefill of the recalled tokens (at most
`reserve`), and llama.cpp's cells need no export. Images are kept as their embeddings (`images`,
float16, up to `image_cap_mib`): ranked by the text around them, they come back whole or not at all.
"""
from __future__ import annotations

import functools
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .images import IMAGE_ID, ImageStore, whole_images
from .embedding import TokenVectors
from .hidden import HiddenStates, maxsim
from .probe import rerank_by_attention
from .ranking import block_starts, bm25, choose, held_verbatim, weighted_bm25
from .store import TokenStore

if TYPE_CHECKING:
    from ..controller import CacheController, Decoded
    from ..policies import Policy

RANKINGS = ("lexical", "embedding", "hidden", "attention")
STORES = ("ram", "disk")
CHECKED_BLOCKS = 64  # the best blocks checked for text the cache holds verbatim
# the default reserve's most cells: re-reading is a prefill before the first answer token, and
# three 32-token blocks hold what a question asks for as often as four did (docs/RESULTS.md)
RESERVE_CAP = 96


@dataclass(frozen=True)
class MemoryConfig:
    """How the memory ranks and re-reads. `reserve`: cells of the budget that re-read blocks may
    take at one prompt (0: a quarter of the budget, at most `RESERVE_CAP`); `window`: tokens a
    block holds, blocks start every half window (0: 64, 32 for the `hidden` ranking, or the
    reserve if smaller); `cap`: tokens kept in RAM (12 bytes each), the oldest beyond it dropped (`store` "ram") or appended
    to a file in `directory` (`store` "disk"; default: <cache>/memory), deleted with the session
    unless a save names it;
    `image_cap_mib`: the images' embeddings kept in RAM (float16), the oldest dropped beyond;
    `vector_cap`: tokens whose hidden-state vectors the `hidden` ranking keeps (66 bytes each)."""
    ranking: str = "hidden"
    reserve: int = 0
    window: int = 0
    cap: int = 4_000_000
    store: str = "ram"
    directory: str | None = None
    image_cap_mib: int = 1024
    vector_cap: int = 1_000_000

    def __post_init__(self) -> None:
        if self.ranking not in RANKINGS:
            raise ValueError(f"unknown memory ranking {self.ranking!r}: pass --memory-ranking {' or '.join(RANKINGS)}")
        if self.store not in STORES:
            raise ValueError(f"unknown memory store {self.store!r}: pass --memory-store {' or '.join(STORES)}")
        if self.window == 1 or self.window < 0:
            raise ValueError(f"a memory block must hold at least 2 tokens (got window {self.window})")
        if self.reserve < 0 or self.cap < max(self.window, 2):
            raise ValueError(f"the memory reserve ({self.reserve}) must be >= 0 and its cap ({self.cap}) at least a "
                             f"block ({self.window} tokens)")

    def config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> "MemoryConfig":
        """The config of a saved record: options added since take their defaults, a newer
        version's are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})

    def reserve_for(self, budget: int) -> int:
        return self.reserve or min(budget // 4, RESERVE_CAP)


def memory_label(config: dict | None) -> str:
    """", memory RANKING" (and its reserve when set) for a run's label; "" for none."""
    if not config:
        return ""
    return f", memory {config['ranking']}" + (f" reserve {config['reserve']}" if config.get("reserve") else "")


@dataclass
class MemoryStats:
    tokens_stored: int = 0      # held now, in RAM and on disk
    tokens_on_disk: int = 0
    tokens_dropped: int = 0     # the oldest, beyond the cap (or a failed disk)
    prompts: int = 0            # prompts that ranked the memory
    tokens_recalled: int = 0    # re-read, all prompts together
    spans_recalled: int = 0
    recall_s: float = 0.0       # ranking and re-reading, all prompts together
    last_recalled: list = field(default_factory=list)  # [first stream index, last + 1] of each span at the last prompt
    last_recall_s: float = 0.0
    images_stored: int = 0      # kept now (their cells are counted in tokens_stored too)
    image_bytes: int = 0        # their embeddings
    images_dropped: int = 0     # the oldest, beyond image_cap_mib
    images_recalled: int = 0    # re-read whole, all prompts together
    vector_bytes: int = 0       # the hidden ranking's vectors

    @property
    def host_bytes(self) -> int:
        """RAM that the stored tokens, images and vectors take (the disk's part aside)."""
        return ((self.tokens_stored - self.tokens_on_disk) * TokenStore.BYTES_PER_TOKEN + self.image_bytes
                + self.vector_bytes)


def recall_room(policy: "Policy", n_prompt: int) -> int:
    """The most cells that re-read memory may take before a prompt of `n_prompt` tokens, all within
    the budget: what is left when the policy keeps its fewest cells (none if it never evicts)."""
    return max(policy.budget - n_prompt - policy.min_cells, 0) if policy.evicts else 0


def memory_for(setting: "MemoryConfig | dict | bool | None", policy: "Policy") -> "Memory | None":
    """The memory a session under `policy` gets for `setting`: True, the default `MemoryConfig`
    where the budget has room for it; a `MemoryConfig` (or a saved file's record of one); False or
    None, none. A policy that evicts nothing (`full`) has nothing to bring back: none."""
    if not setting or not policy.evicts:
        return None
    if setting is True:
        return Memory(MemoryConfig(), policy.budget) if Memory.fits(MemoryConfig(), policy.budget) else None
    return Memory(MemoryConfig.from_config(setting) if isinstance(setting, dict) else setting, policy.budget)


class Memory:
    """The memory of one session's stream (see the module's docstring). It listens to the
    controller's decodes (`record`); the session feeds each prompt through `read_prompt`."""

    def __init__(self, config: MemoryConfig, budget: int):
        self.config = config
        self.vectors: TokenVectors | None = None  # the `embedding` ranking's, from `prepare`
        self.hidden: HiddenStates | None = None   # the `hidden` ranking's, from `prepare`
        self.reserve, self.window = self.sizes(config, budget)
        if not self.fits(config, budget):
            raise ValueError(f"the memory reserve ({self.reserve} cells) must hold a block ({self.window} tokens) "
                             f"and at most half the budget ({budget // 2}): pass another --memory-reserve, a larger "
                             "--budget, or --memory off")
        spill = None
        if config.store == "disk":
            from ..model_files import cache_dir

            spill = Path(config.directory or cache_dir() / "memory") / f"{uuid.uuid4().hex}.tokens"
        self.store = TokenStore(config.cap, spill)
        self.images = ImageStore(config.image_cap_mib * 2 ** 20)
        self.keep_file = False  # a save names the file: it outlives the session
        self._stats = MemoryStats()

    @staticmethod
    def sizes(config: MemoryConfig, budget: int) -> tuple[int, int]:
        """(reserve, window) of `config` at `budget`."""
        reserve = config.reserve_for(budget)
        # the hidden ranking scores single tokens: finer blocks fit more of the best in the reserve
        return reserve, config.window or min(32 if config.ranking == "hidden" else 64, reserve)

    @classmethod
    def fits(cls, config: MemoryConfig, budget: int) -> bool:
        """Whether the reserve holds a block and at most half the budget."""
        reserve, window = cls.sizes(config, budget)
        return 2 <= window <= reserve <= budget // 2

    def prepare(self, model, n_threads: int | None = None) -> object | None:
        """Load what the ranking needs of the `Model`; returns the eval callback that the session's
        context must be made with (the `hidden` ranking's), or None."""
        if self.config.ranking == "embedding":
            self.vectors = TokenVectors.of_model(model.path)
        if self.config.ranking == "hidden":
            self.hidden = HiddenStates(model, self.config.vector_cap, n_threads=n_threads)
            return self.hidden.capture.callback
        return None

    def reset(self) -> None:
        self.store = TokenStore(self.config.cap, self.store.spill)
        self.images = ImageStore(self.config.image_cap_mib * 2 ** 20)
        if self.hidden is not None:
            self.hidden.reset()
        self._stats = MemoryStats()

    def named_by_save(self) -> None:  # the disk store's file outlives the session
        self.keep_file = True

    def close(self) -> None:
        """Delete the file of a disk store that no save names; free the side context."""
        if self.hidden is not None:
            self.hidden.close()
        if self.store.spill is not None and not self.keep_file:
            self.store.spill.unlink(missing_ok=True)

    @property
    def stats(self) -> MemoryStats:
        """A copy of the counters, the store's sizes counted now."""
        self.store.join()  # applies the cap
        return replace(self._stats, tokens_stored=len(self.store), tokens_on_disk=self.store.spilled,
                       tokens_dropped=self.store.dropped, last_recalled=list(self._stats.last_recalled),
                       images_stored=len(self.images.images), image_bytes=self.images.nbytes,
                       images_dropped=self.images.dropped,
                       vector_bytes=self.hidden.store.nbytes if self.hidden is not None else 0)

    # -- recording --------------------------------------------------------------------------
    def record(self, decoded: "Decoded") -> None:
        """Token ids or an image's embeddings just decoded (the controller's `Decoded`); a re-read
        block is kept as copies of what it copies."""
        tokens, indices = decoded.tokens, decoded.indices
        vectors = self.hidden.capture.take(len(indices)) if self.hidden is not None else None
        k = decoded.copies.size  # a batch may end with the prompt after the copies
        if k:
            self.store.add_copies(indices[:k], decoded.copies)
            tokens, indices = tokens[k:], indices[k:]
            vectors = None if vectors is None else (vectors[0][k:], vectors[1][k:])
            if not len(indices):
                return
        if vectors is not None:
            self.hidden.store.append(indices, *vectors)
        if decoded.is_image:
            self.images.add(tokens, int(indices[0]), non_causal=not decoded.causal, layout=decoded.layout)
            self.store.append(np.full(len(indices), IMAGE_ID), indices)
        else:
            self.store.append(tokens, indices)

    # -- recall -----------------------------------------------------------------------------
    def blocks(self, ids: np.ndarray, indices: np.ndarray,
               query: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The blocks of the stored tokens `ids` (stream `indices`) and their scores for `query`:
        (starts, score, matched: query tokens a block shares, or, by meaning, all). The stored text
        does not change during one prompt's recall: computed once. The hidden ranking falls back
        to BM25 where the model's layer output was never seen (a model that names it otherwise)."""
        starts = block_starts(ids.size, self.window)
        if self.config.ranking == "embedding":
            score, matched = weighted_bm25(ids, starts, self.window, self.vectors.expand(np.asarray(query)))
        elif self.hidden is not None and self.hidden.store.present:
            codes, scales = self.hidden.store.aligned(indices)
            score = maxsim(self.hidden.embed(query), codes, scales, starts, self.window, self.hidden.store.mean())
            matched = np.full(starts.size, np.iinfo(np.int64).max)  # meaning, not shared tokens, decides
        else:
            score, matched = bm25(ids, starts, self.window, np.asarray(query))
        return starts, score, matched

    def rank(self, cache: "CacheController", query: Sequence[int], ids: np.ndarray, indices: np.ndarray,
             blocks: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The blocks of the stored tokens (`ids`, `indices`: `store.arrays()`) worth re-reading for
        `query`, best first: (order, block starts). A block qualifies when the cache holds less
        than half of it, or, when each layer keeps its own tokens, when any layer lacks any of it
        (per-layer eviction scatters a fact over the layers, each holding fragments, and the model
        answers from them: 4813 for 48213); for the word rankings, when it shares at least two
        distinct tokens with the query (one if the query has one); and when it scores above every
        block the cache holds: a weaker match than what the cache already has would only distract
        (a fact still cached, and another needle with the same words re-read right before the
        question, which the model then answers from); and when the cache does not hold its text
        word for word elsewhere (a repeated sentence).
        `blocks`: `self.blocks(ids, indices, query)`, when already computed."""
        starts, score, matched = blocks if blocks is not None else self.blocks(ids, indices, query)
        rows = cache.cells.held_by_layer
        held = self.store.held(indices, functools.reduce(np.intersect1d, rows))  # held by every layer
        count = np.concatenate(([0], np.cumsum(held)))
        ends = np.minimum(starts + self.window, ids.size)
        needed = ends - starts if len(rows) > 1 else (ends - starts + 1) // 2  # per layer: all of it
        mostly_gone = count[ends] - count[starts] < needed
        need = min(2, np.unique(np.asarray(query)).size)
        best_held = score[~mostly_gone].max(initial=0.0)
        eligible = np.flatnonzero(mostly_gone & (matched >= need) & (score > best_held))
        order = eligible[np.argsort(-score[eligible], kind="stable")]
        # text the cache holds word for word elsewhere (a repeated sentence) is not re-read: checked
        # for the best blocks, more than the reserve can take
        first = order[:CHECKED_BLOCKS]
        repeated = held_verbatim(ids, held, starts, self.window, first, skip=IMAGE_ID)
        return np.concatenate((first[~repeated], order[CHECKED_BLOCKS:])), starts

    def read_prompt(self, cache: "CacheController", query: Sequence[int], prompt: Sequence[int], chunk: int) -> int:
        """Feed the token ids `prompt` after re-reading the blocks `query` ranks best, room made
        in the cache for both; returns the number of tokens re-read. The re-read text and the
        prompt go in one batch: on a CPU, a batch of twenty tokens takes about what one of eighty
        does, so re-reading each span apart cost a prefill per span before the first answer token."""
        t0 = time.perf_counter()
        prompt = list(prompt)
        self._stats.prompts += 1
        ids, indices = self.store.arrays()
        spans = self._spans(cache, query, ids, indices, len(prompt))
        recall_s = time.perf_counter() - t0  # the ranking
        first, n = cache.stats.tokens_seen, sum(b - a for a, b in spans)
        offsets = np.cumsum([0] + [b - a for a, b in spans])  # the copies take stream indices in order
        self._stats.last_recalled = [[first + int(o), first + int(o) + b - a] for o, (a, b) in zip(offsets, spans)]
        t = time.perf_counter()
        fed = self._reread(cache, ids, indices, spans, chunk, prompt) if spans else False
        # a batch that held the prompt too is counted by its re-read share
        recall_s += (time.perf_counter() - t) * (n / (n + len(prompt)) if fed else 1.0)
        if prompt and not fed:
            cache.feed(prompt, chunk)
        self._stats.tokens_recalled += n
        self._stats.spans_recalled += len(spans)
        self._stats.last_recall_s = recall_s
        self._stats.recall_s += recall_s
        return n

    def _spans(self, cache: "CacheController", query: Sequence[int], ids: np.ndarray, indices: np.ndarray,
               n_prompt: int) -> list[tuple[int, int]]:
        """The stored token ranges to re-read before a prompt of `n_prompt` tokens, room made for
        them and the prompt."""
        room = min(self.reserve, recall_room(cache.policy, n_prompt))
        if room < 1 or ids.size == 0:
            return []
        blocks = self.blocks(ids, indices, query)
        spans = self._choose(cache, query, ids, indices, room, blocks)
        n = sum(b - a for a, b in spans)
        if n and cache.make_room(n + n_prompt):
            # what the policy just evicted for the room may be what the query wants (a fact it
            # still held): rank again, for the room made
            spans = self._choose(cache, query, ids, indices, n, blocks)
        return spans

    def _reread(self, cache: "CacheController", ids: np.ndarray, indices: np.ndarray, spans: list[tuple[int, int]],
                chunk: int, then: list[int]) -> bool:
        """Decode the stored token ranges `spans` again, in order: text as token ids, the spans' text
        in one batch, each image (whole: `whole_images`) as its embeddings, the way it was first
        decoded; the token ids `then` in the same batch as the last text, when the spans end with
        text (returns whether they were fed)."""
        at = np.concatenate([np.arange(a, b) for a, b in spans])
        fed, i = False, 0
        while i < at.size:
            if ids[at[i]] != IMAGE_ID:
                image_at = np.flatnonzero(ids[at[i:]] == IMAGE_ID)
                end = i + int(image_at[0]) if image_at.size else at.size
                fed = end == at.size and bool(then)
                cache.feed(ids[at[i:end]].tolist() + (then if fed else []), chunk, copies=indices[at[i:end]])
                i = end
                continue
            image = self.images.at(int(indices[at[i]]))
            embeddings = image.embeddings.astype(np.float32)
            copies = indices[at[i:i + len(embeddings)]]
            if image.non_causal or image.layout is not None:
                cache.decode(embeddings, causal=not image.non_causal, layout=image.layout, copies=copies)
            else:
                cache.feed(embeddings, chunk, copies=copies)
            self._stats.images_recalled += 1
            i += len(embeddings)
        return fed

    def _choose(self, cache: "CacheController", query: Sequence[int], ids: np.ndarray, indices: np.ndarray,
                room: int, blocks: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[tuple[int, int]]:
        """The stored token ranges to re-read for `query` in `room` tokens, by the configured
        ranking, images whole."""
        order, starts = self.rank(cache, query, ids, indices, blocks)
        if order.size and self.config.ranking == "attention":
            order = rerank_by_attention(cache, order, starts, self.window, ids, query)
        spans = choose(order, starts, self.window, ids.size, room)
        return whole_images(spans, ids, indices, self.images, room) if np.any(ids == IMAGE_ID) else spans

    # -- state ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta, arrays = self.store.state()
        images_meta, image_arrays = self.images.state()
        stats = asdict(self.stats)
        vectors = self.hidden.store.state() if self.hidden is not None else {}
        return {"store": meta, "images": images_meta, "stats": stats, "config": self.config.config()}, \
            {**arrays, **image_arrays, **vectors}

    def check_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        TokenStore.check_state(meta.get("store", {}), arrays)
        ImageStore.check_state(arrays)
        saved, mine = meta.get("config") or {}, self.config.config()
        if any(saved[k] != mine[k] for k in saved.keys() & mine.keys()):  # options added since: their defaults
            raise ValueError(f"the saved memory ran with {saved}, this session's with {mine}")

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        own = self.store.spill
        self.store.load_state(meta["store"], arrays)
        self.images.load_state(meta.get("images", {}), arrays)
        if self.hidden is not None:
            self.hidden.store.load_state(arrays)
        if self.store.spill != own:  # a saved session's file: its save still names it
            self.keep_file = True
        names = {f.name for f in fields(MemoryStats)}  # counters added since start at 0
        self._stats = MemoryStats(**{k: v for k, v in meta.get("stats", {}).items() if k in names})
