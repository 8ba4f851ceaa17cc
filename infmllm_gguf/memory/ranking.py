"""Ranking the memory's blocks for a prompt: pure NumPy functions, testable without a model.

The memory holds the stream's tokens in order; a *block* is a window of `window` tokens starting
every `window // 2` tokens, so any fact of at most half a window lies whole in some block. Two
rankings (docs/METHOD.md, "Memory beyond the budget"):

- `lexical`: BM25 of the prompt's token ids over each block's token ids (Robertson and Zaragoza,
  "The Probabilistic Relevance Framework: BM25 and Beyond", 2009): the rare tokens that the prompt
  and a block share (a name, a label) weigh most.
- `embedding`: the same BM25, where a token near a query token in the model's embedding table
  counts as a partial occurrence of it, weighted by their cosine (`weighted_bm25`; the neighbours
  come from `embedding.TokenVectors`): words matched by meaning as well as by spelling.
- `attention`: the lexical shortlist re-read into the cache, then ranked by the attention the
  prompt's own queries give each block (the paper's retrieval window), as InfLLM ranks its blocks
  by the current queries (Xiao et al., "InfLLM", 2024); the re-reading is `Memory`'s.
"""
from __future__ import annotations

import numpy as np

from ..cells import runs

K1, B = 1.2, 0.75  # BM25's usual constants


def block_starts(n_tokens: int, window: int) -> np.ndarray:
    """Start offsets of the blocks over `n_tokens` tokens: every `window // 2`, the last block
    ending at the last token (none when there are no tokens)."""
    if n_tokens <= 0:
        return np.zeros(0, dtype=np.int64)
    stride = max(window // 2, 1)
    starts = np.arange(0, max(n_tokens - window, 0) + 1, stride, dtype=np.int64)
    if starts[-1] + window < n_tokens:
        starts = np.append(starts, n_tokens - window)
    return starts


def bm25(tokens: np.ndarray, starts: np.ndarray, window: int, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BM25 of each block (tokens[s:s+window] for s in `starts`) for the query's distinct token ids.

    Returns (score float64[n_blocks], matched int[n_blocks]: how many distinct query tokens the
    block holds). Every block but a short stream's only one has `window` tokens, so the length
    normalisation only matters there."""
    terms = np.unique(np.asarray(query, dtype=np.int64))
    return weighted_bm25(tokens, starts, window, [(np.array([t]), np.ones(1)) for t in terms])


def weighted_bm25(tokens: np.ndarray, starts: np.ndarray, window: int,
                  terms: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """BM25 as `bm25`, each query term given as (token ids, weights): an occurrence of any of its
    ids counts as its weight in the term's frequency (1 for the term itself, a cosine for a
    neighbour). Returns (score, matched: how many terms the block holds with any weight)."""
    n_blocks = starts.size
    if n_blocks == 0 or not terms:
        return np.zeros(n_blocks), np.zeros(n_blocks, dtype=np.int64)
    tokens = np.asarray(tokens)
    ends = np.minimum(starts + window, tokens.size)
    tf = np.zeros((n_blocks, len(terms)))
    for j, (ids, weights) in enumerate(terms):  # tens of terms: one pass over the memory each
        if ids.size == 1:
            occurs = (tokens == ids[0]) * weights[0]
        else:
            order = np.argsort(ids)
            ids, weights = ids[order], weights[order]
            at = np.minimum(np.searchsorted(ids, tokens), ids.size - 1)
            occurs = np.where(ids[at] == tokens, weights[at], 0.0)
        count = np.concatenate(([0], np.cumsum(occurs)))
        tf[:, j] = count[ends] - count[starts]
    lengths = ends - starts
    norm = K1 * (1 - B + B * lengths / lengths.mean())
    df = np.count_nonzero(tf > 1e-9, axis=0)
    idf = np.log1p((n_blocks - df + 0.5) / (df + 0.5))
    score = (tf * (K1 + 1) / (tf + norm[:, None]) * idf).sum(axis=1)
    return score, np.count_nonzero(tf > 1e-9, axis=1)


def held_verbatim(tokens: np.ndarray, held: np.ndarray, starts: np.ndarray, window: int,
                  blocks: np.ndarray, skip: int = -1, piece: int = 8) -> np.ndarray:
    """bool[len(blocks)]: whether each block's text (tokens[s:s+window], s = starts[k] for k in
    `blocks`) is held already: every run of `piece` tokens in it occurs, contiguous, inside a run of
    `held` tokens (a repeated sentence, however the block cuts it), so that re-reading would only
    repeat what the cache holds. Blocks holding the token `skip` (an image's placeholder, whose
    cells differ though the ids match) are never held verbatim."""
    out = np.zeros(len(blocks), dtype=bool)
    tokens = np.asarray(tokens, dtype="<i4")
    separator = np.array([-1], dtype="<i4").tobytes()  # no token id: no piece spans two runs
    text = separator.join(tokens[a:b].tobytes() for a, b in runs(held))
    if not text:
        return out

    def occurs(needle: bytes) -> bool:
        at = text.find(needle)
        while at >= 0 and at % 4:  # a match must start on a token
            at = text.find(needle, at + 1)
        return at >= 0

    for j, k in enumerate(blocks):
        block = tokens[starts[k]:starts[k] + window]
        if np.any(block == skip):
            continue
        size = min(piece, block.size)
        out[j] = all(occurs(block[i:i + size].tobytes()) for i in range(block.size - size + 1))
    return out


def choose(order: np.ndarray, starts: np.ndarray, window: int, n_tokens: int, room: int) -> list[tuple[int, int]]:
    """Blocks taken in `order` (best first) while their union fits `room` tokens; returns the union
    as sorted, merged token ranges [a, b)."""
    taken = np.zeros(n_tokens, dtype=bool)
    used = 0
    for k in order:  # a block's cost is its tokens not taken yet: O(window) each, not O(n_tokens)
        a, b = int(starts[k]), int(min(starts[k] + window, n_tokens))
        new = (b - a) - int(np.count_nonzero(taken[a:b]))
        if used + new > room:
            continue
        taken[a:b] = True
        used += new
        if used == room:
            break
    return runs(taken)
