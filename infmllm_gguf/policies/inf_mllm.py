"""Inf-MLLM: keep the recent tokens and the attention saddles of the retrieval window."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import (LAYER_REDUCTIONS, Policy, Selection, _check_chunk, age_rank, check_float,
                   check_inputs, check_int, keep_top, protected)


@dataclass
class InfMLLM(Policy):
    """Inf-MLLM eviction (Ning, Zhao, Jin, Ding, Guo, "Inf-MLLM: Efficient Streaming Inference of
    Multimodal Large Language Models on a Single GPU", 2024, arXiv:2409.09086).

    The project's reconstruction (docs METHOD.md, "ours, precisely"), after each decoded chunk:

    1. ``attention[l, j]``: the attention the retrieval window (the last ``window`` queries, which
       are the last ``window`` ids, contiguous) gave to cell ``j`` in layer ``l``, summed over heads
       and queries (as the capture patch reports it);
    2. visibility average: ``a_l[j] /= n_visible(j)``, ``n_visible(j) = min(window, ids[-1] - ids[j] + 1)``
       (a key inside the window is seen only by the queries at or after it);
    3. layers combined by ``layer_reduce``: "mean" (METHOD's default) or "max";
    4. memory: ``S = decay * memory + a`` (decay 0: the paper's local window; 1: H2O's sum);
    5. attention bias: ``score = S / mean(S) + bias * rank``, over the candidates (the cells not
       protected below): ``mean`` is taken over the candidates, ``rank`` is the age rank among them
       scaled to [0, 1] (0 oldest, 1 newest);
    6. keep the ``recent`` highest ids, the sinks present (ids < ``sinks``) and the best
       ``budget - recent - sinks present`` candidates by score (equal scores: the newer wins).

    ``Selection.memory`` is ``S`` of the kept cells. If the candidates' scores are all 0 (mean 0),
    step 5 uses ``S`` unnormalised (all 0), so only the bias and the tie rule decide.
    """
    recent: int = 64
    sinks: int = 0
    window: int = 32
    bias: float = 0.5  # the sweep in docs/RESULTS.md (SmolLM2, 8k tokens of Shakespeare): best at budgets 512 and 1024
    decay: float = 0.0
    layer_reduce: str = "mean"

    name: ClassVar[str] = "inf-mllm"

    def validate(self) -> None:
        check_int(self, "window", minimum=1)
        check_float(self, "bias", 0.0)
        check_float(self, "decay", 0.0, 1.0)
        if self.layer_reduce not in LAYER_REDUCTIONS:
            raise ValueError(f"unknown layer reduction {self.layer_reduce!r}: pass --layer-reduce "
                             f"{' or '.join(LAYER_REDUCTIONS)}")
        super().validate()

    def capture_window(self, chunk: int) -> int:
        _check_chunk(chunk)
        return min(self.window, int(chunk))

    def select(self, ids: np.ndarray, attention: np.ndarray | None,
               memory: np.ndarray | None) -> Selection:
        ids, attention, memory = check_inputs(self, ids, attention, memory, need_attention=True)
        n_visible = np.minimum(self.window, ids[-1] - ids + 1).astype(np.float64)
        per_layer = attention / n_visible                                   # steps 1-2
        a = per_layer.mean(axis=0) if self.layer_reduce == "mean" else per_layer.max(axis=0)
        s = a if memory is None or self.decay == 0.0 else self.decay * memory + a   # step 4

        keep = protected(ids, self.recent, self.sinks)
        candidates = ~keep
        s_c = s[candidates]
        mean = s_c.mean()
        score = np.zeros_like(s)
        score[candidates] = (s_c / mean if mean > 0 else s_c) + self.bias * age_rank(s_c.size)  # step 5
        keep = keep_top(keep, score, self.budget)                           # step 6
        return Selection(keep=keep, memory=s[keep])
