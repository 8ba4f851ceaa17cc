"""The model's own token embeddings, for a ranking that matches words by meaning (`ranking="embedding"`).

The input embedding table of a language model places a token near its case and inflection
variants, translations and, more weakly, its synonyms (on Qwen2.5-0.5B: " lawyer" to " attorney"
0.59, " sister" to " sibling" 0.50, " cat" to " pet" 0.23). `TokenVectors.expand` turns each
distinct query token into the tokens nearest to it, with their cosine as weight, and BM25 counts
those as partial occurrences of the query's word (`ranking.weighted_bm25`): a block that says
"my sister has a cat" scores for "my sibling's pet" although it shares none of its tokens.

The table is read from the GGUF once (dequantized with the `gguf` package), projected to
`DIMENSIONS` dimensions by a fixed random matrix (cosines are kept within about 1/sqrt(DIMENSIONS),
Johnson-Lindenstrauss), normalised, and cached as float16 under `<cache>/token-vectors/`: vocabulary
x 256 x 2 bytes (78 MB for Qwen2.5's 151,936 tokens), whatever the model's width, shared by every
session of the process. Nothing is stored per stream token.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

DIMENSIONS = 256
NEIGHBOURS = 16    # nearest tokens taken for each query token
MIN_COSINE = 0.35  # weaker neighbours are other words, not the same one
ROWS = 8192        # rows dequantized at a time: bounds the float32 copy


class TokenVectors:
    """Unit vectors of a model's tokens (float16[vocabulary, DIMENSIONS])."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    @classmethod
    @functools.lru_cache(maxsize=4)
    def of_model(cls, path: str | os.PathLike) -> "TokenVectors":
        """The vectors of the GGUF at `path`, from the disk cache or made (and cached) now."""
        path = Path(path)
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{DIMENSIONS}".encode()).hexdigest()
        from ..model_files import cache_dir

        cached = cache_dir() / "token-vectors" / f"{key[:32]}.npy"
        if cached.exists():
            return cls(np.load(cached))
        vectors = project_embeddings(path)
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".partial.npy")
        np.save(partial, vectors)
        partial.replace(cached)
        return cls(vectors)

    def expand(self, query: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each distinct token of `query` (sorted): (token ids, weights) of the tokens that
        count as it, itself with weight 1 first, then its nearest neighbours above MIN_COSINE."""
        out = []
        for term in np.unique(np.asarray(query, dtype=np.int64)):
            if not 0 <= term < len(self.vectors):
                out.append((np.array([term]), np.ones(1)))
                continue
            cosine = self.vectors @ self.vectors[term].astype(np.float32)
            near = np.argpartition(-cosine, NEIGHBOURS)[:NEIGHBOURS + 1]
            near = near[(near != term) & (cosine[near] >= MIN_COSINE)]
            out.append((np.concatenate(([term], near)), np.concatenate(([1.0], cosine[near].astype(np.float64)))))
        return out


def project_embeddings(path: Path) -> np.ndarray:
    """The GGUF's `token_embd.weight` rows, projected to DIMENSIONS by a fixed Gaussian matrix and
    normalised: float16[vocabulary, DIMENSIONS]."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if tensor is None:
        raise ValueError(f"{path} has no token_embd.weight: the embedding ranking needs the model's token embeddings "
                         "(pass --memory-ranking lexical)")
    width = int(tensor.shape[0])
    projection = np.random.default_rng(0).standard_normal((width, DIMENSIONS)).astype(np.float32)
    out = np.empty((tensor.data.shape[0], DIMENSIONS), dtype=np.float16)
    for a in range(0, len(out), ROWS):
        rows = gguf.dequantize(tensor.data[a:a + ROWS], tensor.tensor_type).astype(np.float32) @ projection
        rows /= np.linalg.norm(rows, axis=1, keepdims=True) + 1e-12
        out[a:a + ROWS] = rows
    return out
