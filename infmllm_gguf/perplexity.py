"""Perplexity of a token stream read through a bounded cache."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .session import StreamSession


@dataclass(frozen=True)
class PerplexityRun:
    policy: str
    budget: int
    chunk: int
    tokens: int
    ppl: float
    tokens_per_s: float
    peak_cells: int
    evict_share: float   # of stream time: selecting, removing and re-indexing
    capture_share: float  # of stream time: reading and aligning scores


def stream_perplexity(tokens, *, model_path=None, policy: str = "inf-mllm", budget: int = 512, chunk: int = 256,
                      **options) -> PerplexityRun:
    """Stream `tokens` chunk by chunk and score each token's NLL given the bounded cache."""
    with StreamSession(model_path, budget=budget, policy=policy, chunk=chunk, **options) as s:
        t0 = time.perf_counter()
        nll = s.token_nll(tokens)
        elapsed = time.perf_counter() - t0
        stats = s.stats
        return PerplexityRun(policy, budget, chunk, len(tokens), float(np.exp(nll.mean())),
                             len(tokens) / elapsed, stats.peak_cells,
                             stats.evict_s / elapsed, stats.capture_s / elapsed)
