"""Inf-MLLM: keep the recent tokens and the attention saddles of the retrieval window."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Observation, Policy, ScoredPolicy, age_rank, default_of, granularity_option, option

LAYER_REDUCTIONS = ("mean", "max")


@dataclass
class InfMLLM(ScoredPolicy):
    """Inf-MLLM eviction (Ning, Zhao, Jin, Ding, Guo, "Inf-MLLM: Efficient Streaming Inference of
    Multimodal Large Language Models on a Single GPU", 2024, arXiv:2409.09086), as this project
    reconstructs it (docs/METHOD.md, "The rule"). Per cell ``j``, after a decoded chunk:

    1. ``attention[l, j]``: what the retrieval window (the chunk's last ``window`` queries) gave
       cell ``j`` in layer ``l``, summed over heads and queries;
    2. visibility average: ``a_l[j] = attention[l, j] / visibility[j]``, the queries that could see
       the cell (a key inside a causal window is seen only by the queries at or after it);
    3. layers combined by ``layer_reduce`` (mean or max);
    4. carried score: ``S = decay * carried + a`` (decay 0: the paper's local window; 1: H2O's sum);
    5. attention bias: ``score = S / mean(S) + bias * rank`` over the candidates (the cells not
       protected), ``rank`` their age rank scaled to [0, 1] (0 oldest, 1 newest); if the
       candidates' S are all 0, S stays unnormalised and the bias and the tie rule decide;
    6. age limit: candidates more than ``max_age * budget`` tokens older than the newest cell score
       -inf, so they go before any other (0: no limit); with it the first ``sinks`` tokens must be
       kept explicitly, as the age limit would evict the attention sink too;
    7. the base keeps the ``recent`` newest, the sinks present and the best-scored candidates.

    ``Selection.carried`` is ``S`` of the kept cells.

    With ``granularity`` "layer" each layer decides for itself (docs/METHOD.md): steps 2-7 run on
    each layer's own row (`ScoredPolicy`, which any scoring policy shares). "auto" (the default)
    is "layer" where the cache can be compacted per layer and "token" elsewhere (sliding-window
    layers, positions llama.cpp cannot shift): the controller settles it (`CacheController`).
    """
    sinks: int = default_of(Policy, "sinks", 4)
    window: int = option(32, "retrieval window: the last W queries of each chunk are scored", minimum=1)
    bias: float = option(0.5, "attention bias toward newer tokens", minimum=0.0)
    decay: float = option(0.0, "share of the carried score kept across evictions (0: none, 1: all)",
                          minimum=0.0, maximum=1.0)
    layer_reduce: str = option("mean", "how the layers' scores combine", choices=LAYER_REDUCTIONS)
    # docs/RESULTS.md, "The drift and its fix": chosen on 50k-token streams, confirmed on 205k
    max_age: float = option(2.0, "candidates older than this many budgets (in tokens) go first (0: no limit)",
                            minimum=0.0, absent=0.0)
    # docs/RESULTS.md, "Per-layer eviction in llama.cpp": ahead at every budget on 205k tokens
    granularity: str = granularity_option("auto")

    name: ClassVar[str] = "inf-mllm"
    reads_attention: ClassVar[bool] = True

    def check_chunk(self, chunk: int) -> None:
        if self.window > chunk:
            raise ValueError(f"window ({self.window}) must not exceed chunk ({chunk}): lower --window or raise --chunk")

    def capture_queries(self, chunk: int) -> int:
        return min(self.window, chunk)

    @property
    def accumulates_attention(self) -> bool:
        return self.decay > 0

    def score(self, obs: Observation, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_layer = obs.attention / obs.visibility                                  # steps 1-2
        a = per_layer.mean(axis=0) if self.layer_reduce == "mean" else per_layer.max(axis=0)
        s = a if obs.carried is None or self.decay == 0.0 else self.decay * obs.carried + a  # step 4
        s_c = s[candidates]
        mean = s_c.mean()
        score = np.zeros_like(s)
        score[candidates] = (s_c / mean if mean > 0 else s_c) + self.bias * age_rank(s_c.size)  # step 5
        if self.max_age:                                                            # step 6
            too_old = obs.stream_indices[-1] - obs.stream_indices > self.max_age * self.budget
            score[candidates & too_old] = -np.inf
        return score, s
