"""One measured stretch of a stream, as `perplexity` and `bench` record them."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .controller import CacheStats
from .probes import GpuMemory, rss_mib


@dataclass
class Segment:
    """One stretch of a stream. `tokens` is the run's count where the segment ends (tokens
    streamed for `bench`, tokens scored for `perplexity`: one fewer, the first has no prediction).

    `cpu_s` is this process's CPU time over the stretch: on a shared machine, tokens per CPU second
    show whether the work per token grows with the stream, whatever else the machine runs.
    `evict_s` and `capture_s` are the parts of `seconds` spent selecting, removing and re-indexing
    cells, and reading scores (None in records of runs made before they were measured). `ppl` is
    the stretch's own perplexity, when the run scores tokens. None: not measured."""
    tokens: int
    seconds: float
    cpu_s: float
    cells: int
    rss_mib: float | None
    gpu_mib: float | None = None
    evict_s: float | None = None
    capture_s: float | None = None
    ppl: float | None = None


def tokens_per_s(segments: Sequence[Segment], start: int = 0) -> np.ndarray:
    """Tokens/s of each segment; `start`: the run's count before the first of them."""
    ends = np.array([s.tokens for s in segments], dtype=np.float64)
    return np.diff(np.concatenate(([start], ends))) / np.array([s.seconds for s in segments])


class SegmentClock:
    """Measures one segment after another of a stream whose counters `stats()` reads."""

    def __init__(self, stats: Callable[[], CacheStats], gpu: GpuMemory | None = None):
        self.stats, self.gpu = stats, gpu
        self.restart()

    def restart(self, elapsed: Sequence[float] = (0.0, 0.0, 0.0, 0.0)) -> None:
        """Start a segment; `elapsed`, from `elapsed()`, continues one begun before a save."""
        seconds, cpu_s, evict_s, capture_s = elapsed
        st = self.stats()
        self._t0, self._cpu0 = time.perf_counter() - seconds, time.process_time() - cpu_s
        self._evict0, self._capture0 = st.evict_s - evict_s, st.capture_s - capture_s

    def elapsed(self) -> tuple[float, float, float, float]:
        """(seconds, CPU seconds, eviction seconds, capture seconds) of the segment so far."""
        st = self.stats()
        return (time.perf_counter() - self._t0, time.process_time() - self._cpu0,
                st.evict_s - self._evict0, st.capture_s - self._capture0)

    def end(self, tokens: int, *, ppl: float | None = None) -> Segment:
        """The segment ending at `tokens`; the next one starts now."""
        seconds, cpu_s, evict_s, capture_s = self.elapsed()
        segment = Segment(tokens, seconds, cpu_s, self.stats().cells_cached, rss_mib(),
                          self.gpu.used_mib() if self.gpu else None, evict_s, capture_s, ppl)
        self.restart()
        return segment
