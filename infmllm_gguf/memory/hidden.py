"""The model's own hidden states, for a ranking that follows meaning (`ranking="hidden"`).

A middle layer's output (`l_out-<n_layer // 3>`) places a token by what it means in its sentence,
not by how it is spelled: "sister" in "my sister has a cat" lies near "sibling" in "my sibling's
pet". The stream's decode hands each token's vector to the memory through llama.cpp's eval
callback (`HiddenCapture`, no second forward pass); the prompt is decoded alone in a small side
context for its own. A block scores by late interaction as ColBERT does (Khattab and Zaharia,
SIGIR 2020): each prompt token takes its most similar token in the block, the similarities
averaged (`maxsim`). Vectors are centred on the stream's mean (a causal model's hidden states
share one large direction) and projected to `DIMENSIONS` by a fixed random matrix, kept as int8
codes with a float16 scale per token (`quantize`): `VECTOR_BYTES` bytes a token (66), the newest
`cap` tokens kept (`VectorStore`).

Measured before it was built (Qwen2.5-0.5B, layer 8 of 24, 64 dimensions): the block that holds a
paraphrased fact ranks in the top 3 of 76 blocks for 12 of 16 questions by `maxsim`, 5 of 16 by a
mean-pooled vector, 0 of 16 by BM25. Among the 12,500 blocks of a 200k-token stream that holds all
16 facts, 2.8 of them on average over five projections (3.2-3.8 at layer 6 or 8 with 64-256
dimensions, 4-6 with all 896: `scripts/hidden_probe.py`; docs/METHOD.md, "Memory beyond the budget").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..runtime import Runtime, ggml

DIMENSIONS = 64
VECTOR_BYTES = DIMENSIONS + 2  # int8 codes and a float16 scale, per token
PREFIX = "l_out-"  # llama.cpp names each layer's output l_out-<il>


def hidden_layer(n_layer: int) -> int:
    return max(n_layer // 3, 0)


def quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [n, d], float16 scales [n]) with row ~ scale * codes, a zero row all zeros: half
    the bytes of float16, and the same ten best blocks for each of 16 questions over a 200k-token
    stream (`scripts/hidden_probe.py`)."""
    scales = (np.abs(rows).max(axis=1, initial=0.0) / 127).astype(np.float16)
    safe = np.where(scales > 0, scales.astype(np.float32), 1.0)
    return np.rint(rows / safe[:, None]).clip(-127, 127).astype(np.int8), scales


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scales.astype(np.float32)[:, None]


def no_vectors(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) of `n` tokens without a vector: zeros."""
    return np.zeros((n, DIMENSIONS), np.int8), np.zeros(n, np.float16)


class HiddenCapture:
    """An eval callback (`callback`) that keeps, projected and quantized, the rows of one layer's
    output that each decode computes (`take` hands over the last ones). With `stop`, the forward
    pass ends there (the side context needs no more)."""

    def __init__(self, n_layer: int, n_embd: int, *, stop: bool = False):
        # Gaussian, scaled to keep a vector's norm (Johnson-Lindenstrauss)
        rng = np.random.default_rng(0)
        self.projection = (rng.standard_normal((n_embd, DIMENSIONS)) / np.sqrt(DIMENSIONS)).astype(np.float32)
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []
        self.callback = ggml.tensor_reader(f"{PREFIX}{hidden_layer(n_layer)}", self._receive, stop=stop)

    def _receive(self, rows: np.ndarray) -> None:
        # a layer's large activations (hundreds) keep the scale far inside float16's range
        self.rows.append(quantize(np.clip(rows @ self.projection, -65000, 65000)))

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes, scales) of the last `n` tokens decoded (zeros where the layer was not seen), the
        rest forgotten."""
        seen = sum(len(c) for c, _ in self.rows)
        codes, scales = (np.concatenate(part) for part in zip(no_vectors(max(n - seen, 0)), *self.rows))
        self.rows = []
        return codes[len(codes) - n:], scales[len(scales) - n:]


class VectorStore:
    """The stream tokens' vectors (int8 codes and float16 scales, `quantize`), with their stream
    indices, the newest `cap` kept, and the mean of those kept (a running sum: the ranking centres
    on it at each prompt)."""

    def __init__(self, cap: int):
        self.cap = cap
        self._pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._sum, self._count = np.zeros(DIMENSIONS, np.float64), 0

    def append(self, indices: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
        self._pieces.append((np.asarray(indices, dtype=np.int64), codes, scales))
        self._add(codes, scales, 1)
        if len(self._pieces) > 64:
            self.arrays()

    def _add(self, codes: np.ndarray, scales: np.ndarray, sign: int) -> None:
        total, count = present_sum(codes, scales)
        self._sum += sign * total
        self._count += sign * count

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stream indices int64[n], codes int8[n, DIMENSIONS], scales float16[n]), oldest first."""
        if len(self._pieces) != 1 or len(self._pieces[0][0]) > self.cap:
            indices, codes, scales = (np.concatenate(part) for part in zip((np.zeros(0, np.int64), *no_vectors(0)),
                                                                          *self._pieces))
            self._add(codes[:-self.cap], scales[:-self.cap], -1)
            self._pieces = [(indices[-self.cap:], codes[-self.cap:], scales[-self.cap:])]
        return self._pieces[0]

    @property
    def present(self) -> int:
        """How many kept tokens have a vector (the layer was seen: not zeros)."""
        self.arrays()  # applies the cap
        return self._count

    def mean(self) -> np.ndarray:
        """float32[DIMENSIONS]: the mean of the kept vectors that are not zeros."""
        self.arrays()  # applies the cap
        return (self._sum / max(self._count, 1)).astype(np.float32)

    def aligned(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes, scales) of the tokens with stream `indices` (ascending), zeros where none is kept."""
        kept, codes, scales = self.arrays()
        if kept.size <= indices.size and np.array_equal(indices[indices.size - kept.size:], kept):
            if kept.size == indices.size:  # every stored token has its vector: no copy
                return codes, scales
            head_codes, head_scales = no_vectors(indices.size - kept.size)  # the oldest, beyond the cap
            return np.concatenate((head_codes, codes)), np.concatenate((head_scales, scales))
        out_codes, out_scales = no_vectors(indices.size)
        at = np.searchsorted(indices, kept)
        found = (at < indices.size) & (indices[np.minimum(at, indices.size - 1)] == kept)
        out_codes[at[found]], out_scales[at[found]] = codes[found], scales[found]
        return out_codes, out_scales

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes + s.nbytes for _, c, s in self._pieces)

    def state(self) -> dict[str, np.ndarray]:
        indices, codes, scales = self.arrays()
        return {"vector_indices": indices, "vectors": codes, "vector_scales": scales}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """A save's vectors; one without them (another ranking) or with those of an earlier
        version (float16, 64 dimensions) starts empty: the hidden ranking falls back to BM25 until
        vectors come."""
        indices, codes, scales = (arrays.get(k) for k in ("vector_indices", "vectors", "vector_scales"))
        self._pieces, self._sum, self._count = [], np.zeros(DIMENSIONS, np.float64), 0
        if (indices is None or codes is None or scales is None or codes.dtype != np.int8
                or codes.shape != (len(indices), DIMENSIONS) or scales.shape != (len(indices),)):
            return
        self._pieces = [(indices.astype(np.int64), codes, scales.astype(np.float16))]
        self._add(codes, scales, 1)


CHUNK = 1 << 13  # stream tokens scored at once: one chunk's similarities stay in the CPU's cache


def present_sum(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, int]:
    """(float64[DIMENSIONS] sum, count) of the vectors that are not zeros (a token without one)."""
    total, count = np.zeros(codes.shape[1], np.float64), 0
    for a in range(0, len(codes), CHUNK):
        present = scales[a:a + CHUNK] > 0
        total += dequantize(codes[a:a + CHUNK][present], scales[a:a + CHUNK][present]).sum(axis=0, dtype=np.float64)
        count += int(present.sum())
    return total, count


def present_mean(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32[DIMENSIONS]: the mean of the vectors that are not zeros."""
    total, count = present_sum(codes, scales)
    return (total / max(count, 1)).astype(np.float32)


def maxsim(query: np.ndarray, codes: np.ndarray, scales: np.ndarray, starts: np.ndarray, window: int,
           mean: np.ndarray | None = None) -> np.ndarray:
    """Late-interaction score of each block (tokens s..s+window for s in `starts`, their vectors
    scales * codes) for the query's token vectors: each query token's best cosine in the block,
    standardised over the blocks, and averaged. Both are centred on the stored vectors' `mean`
    (`present_mean` when not given) first; a token without a vector (zeros) matches nothing.

    One pass over the vectors, a chunk at a time, never centring them: with v = s c, (q - m).(v - m)
    is s q'.c - q'.m and |v - m|^2 is s^2 |c|^2 - 2 s c.m + |m|^2, so one product of the codes with
    [q' | m] gives both. Blocks start every half window: each query token's best cosine is kept per
    `unit` (the largest length that divides a block and the step between blocks, a half window) and
    a block's is the best of its units; a block off that grid (the last one, ending at the last
    token) is scored apart."""
    n = len(codes)
    if n == 0 or len(query) == 0:
        return np.zeros(len(starts))
    mean = present_mean(codes, scales) if mean is None else mean.astype(np.float32)
    q = query.astype(np.float32) - mean
    q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-6
    products = np.concatenate((q.T, mean[:, None]), axis=1)  # [DIMENSIONS, query tokens + 1]
    offset, mean_norm = q @ mean, float(mean @ mean)

    def cosines(a: int, b: int) -> np.ndarray:  # [tokens a..b, query tokens]
        c, s = codes[a:b].astype(np.float32), scales[a:b].astype(np.float32)
        g = c @ products
        square = np.einsum("ij,ij->i", c, c) * s * s
        norm = np.sqrt(np.maximum(square - 2 * s * g[:, -1] + mean_norm, 0))
        scale = np.where(square > 0, 1.0 / (norm + 1e-6), 0.0).astype(np.float32)
        return (g[:, :-1] * s[:, None] - offset) * scale[:, None]

    width = min(window, n)  # a short stream's one block holds all of it
    unit = int(np.gcd(width, max(width // 2, 1)))
    step = max(CHUNK // unit, 1) * unit
    units = np.concatenate([_unit_max(cosines(a, a + step), unit) for a in range(0, n, step)])
    starts = np.asarray(starts)
    on_grid = (starts % unit == 0) & (starts + width <= len(units) * unit)
    best = np.empty((starts.size, len(q)), np.float32)
    if on_grid.any():
        best[on_grid] = sliding_window_view(units, width // unit, axis=0)[starts[on_grid] // unit].max(axis=-1)
    for i in np.flatnonzero(~on_grid):
        best[i] = cosines(int(starts[i]), int(starts[i]) + width).max(axis=0)
    # standardised per query token, as IDF weighs terms: a token that matches every block alike
    # (the prompt's "Question:", a function word) adds nothing, one that matches a few stands out
    best = (best - best.mean(axis=0)) / (best.std(axis=0) + 1e-6)
    return best.mean(axis=1)


def _unit_max(similarity: np.ndarray, unit: int) -> np.ndarray:
    """The best of each run of `unit` rows (a last partial run left out)."""
    full = len(similarity) // unit * unit
    return similarity[:full].reshape(-1, unit, similarity.shape[1]).max(axis=1)


class HiddenStates:
    """The hidden-state ranking's parts for one session: the stream's capture (its `callback` goes
    to the session's context), the vectors kept, and a side context of `side_cells` cells that
    decodes each prompt alone, up to the captured layer, for its vectors."""

    def __init__(self, model, cap: int, side_cells: int = 256, n_threads: int | None = None):
        self.capture = HiddenCapture(model.n_layer, model.n_embd)
        self.store = VectorStore(cap)
        self._side_capture = HiddenCapture(model.n_layer, model.n_embd, stop=True)
        self._side = Runtime(model, n_ctx=side_cells, n_batch=side_cells, n_threads=n_threads,
                             eval_callback=self._side_capture.callback)
        # the model's BOS, or its first token of a line break where it has none
        self._start = model.bos_token if model.bos_token >= 0 else model.tokenize("\n", add_special=False)[0]

    def reset(self) -> None:
        self.store = VectorStore(self.store.cap)

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """The vectors (float32) of `tokens` (the last side_cells - 2 of a long prompt) decoded alone, after
        a start token whose vector is dropped: a causal model's first position is its attention
        sink, whose state (an outlier that every sequence's first token shares) matched the
        stream's own first block, whatever the prompt asked (docs/METHOD.md)."""
        tokens = [self._start] + list(tokens)[-(self._side.n_ctx - 2):]
        self._side.clear()
        for i in range(0, len(tokens), self._side.n_batch):
            self._side.decode(tokens[i:i + self._side.n_batch], logits="none")
        codes, scales = self._side_capture.take(len(tokens))
        return dequantize(codes[1:], scales[1:])

    def close(self) -> None:
        self._side.close()
