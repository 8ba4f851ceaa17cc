"""What the benchmarks share: a median with its range, the tokens streamed."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime import Model


@dataclass(frozen=True)
class Rate:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values) -> "Rate":
        return cls(float(np.median(values)), float(np.min(values)), float(np.max(values)))

    def __str__(self) -> str:
        return f"{self.median:.4g} [{self.min:.4g}, {self.max:.4g}]"



def stream_tokens(model: Model, n: int, source: str, seed: int = 0) -> np.ndarray:
    """`n` token ids: Shakespeare's plays, repeated if the stream is longer, or random ids (not the
    3 special tokens of the synthetic models' tokenizer)."""
    if source == "random":
        return np.random.default_rng(seed).integers(3, model.n_vocab, n, dtype=np.int32)
    if source != "shakespeare":
        raise ValueError(f"unknown token source {source!r}: 'shakespeare' or 'random'")
    from ..data import shakespeare_path

    text = shakespeare_path().read_text(encoding="utf-8")
    token_ids = np.array(model.tokenize(text[: 8 * n + 1024]), dtype=np.int32)  # tokens are ~4 characters
    return np.resize(token_ids, n)


