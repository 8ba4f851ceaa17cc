"""The baseline of `bench`: StreamingLLM in llama-cpp-python's own API, with no code of this
project in the loop.

`PlainStream` decodes chunks into one llama.cpp context of `budget + chunk` cells and, when the
sequence outgrows the budget, removes the oldest cells after the first `sinks`
(`llama_memory_seq_rm`) and shifts the rest down (`llama_memory_seq_add`): the context shift of
llama.cpp's own tools, kept to an exact budget, as `streaming-llm` keeps it. What a policy costs
on top (the controller, the capture, the selection) is its throughput against this one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from llama_cpp import llama_cpp as llama

from .runtime import SEQ, new_context
from .model import Model

PLAIN = "plain llama.cpp"


@dataclass
class PlainStats:
    """The counters `SegmentClock` and `bench` read, as `CacheStats` names them; nothing is captured."""
    tokens_seen: int = 0
    cells_cached: int = 0
    peak_cells: int = 0
    cells_evicted: int = 0
    decode_s: float = 0.0
    evict_s: float = 0.0    # the seq_rm and seq_add calls
    capture_s: float = 0.0


class PlainStream:
    def __init__(self, model: Model, *, budget: int, sinks: int, chunk: int, flash_attn: bool | None = None,
                 n_threads: int | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16"):
        if budget <= sinks:
            raise ValueError(f"budget ({budget}) must exceed sinks ({sinks})")
        self.model, self.budget, self.sinks, self.chunk = model, budget, sinks, chunk
        self.ctx = new_context(model, n_ctx=budget + chunk, n_batch=chunk, flash_attn=flash_attn,
                               n_threads=n_threads, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
        self.memory = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(chunk, 0, 1)
        self.stats = PlainStats()

    def close(self) -> None:
        if self.ctx:
            llama.llama_batch_free(self.batch)
            llama.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> "PlainStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        llama.llama_memory_clear(self.memory, True)
        self.stats = PlainStats()

    def feed(self, token_ids: Sequence[int]) -> None:
        """Decode `token_ids` chunk by chunk, shifting the context after each chunk as needed."""
        for i in range(0, len(token_ids), self.chunk):
            piece = token_ids[i:i + self.chunk]
            n, start, b = len(piece), self.stats.cells_cached, self.batch
            b.n_tokens = n
            for j, token in enumerate(piece):
                b.token[j], b.pos[j], b.n_seq_id[j], b.seq_id[j][0], b.logits[j] = token, start + j, 1, SEQ, j == n - 1
            t0 = time.perf_counter()
            rc = llama.llama_decode(self.ctx, b)
            self.stats.decode_s += time.perf_counter() - t0
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            cells = start + n
            self.stats.peak_cells = max(self.stats.peak_cells, cells)
            if cells > self.budget:
                t0 = time.perf_counter()
                drop = cells - self.budget
                llama.llama_memory_seq_rm(self.memory, SEQ, self.sinks, self.sinks + drop)
                llama.llama_memory_seq_add(self.memory, SEQ, self.sinks + drop, -1, -drop)
                cells = self.budget
                self.stats.cells_evicted += drop
                self.stats.evict_s += time.perf_counter() - t0
            self.stats.cells_cached = cells
            self.stats.tokens_seen += n

    def wait(self) -> None:
        """Block until the last decode is done (its logits are read)."""
        llama.llama_get_logits_ith(self.ctx, -1)
