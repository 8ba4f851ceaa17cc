"""Embeddings of texts: a llama.cpp context over a `Model` with its embeddings output on, apart from the
contexts that stream (`Runtime`), so that embedding a text leaves their caches alone.

Each text is read alone into an empty cache, every token an output (as llama-cpp-python's
`Llama(embedding=True)` reads them), and comes back pooled as the context's pooling type says: one
vector (mean, CLS or last token), or, with no pooling (a generative model's own type), one vector per
token.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from llama_cpp import llama_cpp as llama

from .cell_state import SEQ
from .closing import Closing
from .log import LOG
from .model import Model

#: llama.h's enum llama_pooling_type, but RANK (a reranker's score, not an embedding)
POOLING_TYPES = {llama.LLAMA_POOLING_TYPE_UNSPECIFIED: "the model's own", llama.LLAMA_POOLING_TYPE_NONE: "none",
                 llama.LLAMA_POOLING_TYPE_MEAN: "mean", llama.LLAMA_POOLING_TYPE_CLS: "cls",
                 llama.LLAMA_POOLING_TYPE_LAST: "last"}
POOLING_UNSPECIFIED = llama.LLAMA_POOLING_TYPE_UNSPECIFIED
POOLING_NONE = llama.LLAMA_POOLING_TYPE_NONE


class Embedder(Closing):
    """A llama.cpp context that embeds texts of up to `n_tokens` tokens with `model` (which must
    outlive it). `pooling`: a key of `POOLING_TYPES` (the model's own by default); `pooling_type`
    is the one the context uses. `flash_attn` None: llama.cpp's choice (on a small model, flash
    attention or not moves the vectors by a few percent). ValueError for a pooling type it does not
    take."""

    def __init__(self, model: Model, *, n_tokens: int = 512, pooling: int = POOLING_UNSPECIFIED,
                 flash_attn: bool | None = None, n_threads: int | None = None):
        if pooling not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(f'{k} ({v})' for k, v in POOLING_TYPES.items())} "
                             f"(got {pooling!r})")
        self.model = model
        params = llama.llama_context_default_params()
        # a model with non-causal attention reads a text in one micro-batch
        params.n_ctx = params.n_batch = params.n_ubatch = n_tokens
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = pooling
        params.flash_attn_type = {None: llama.LLAMA_FLASH_ATTN_TYPE_AUTO, True: llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  False: llama.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        params.offload_kqv = params.op_offload = model.n_gpu_layers != 0
        params.n_threads = params.n_threads_batch = n_threads or max(1, os.cpu_count() or 1)
        LOG.pop_errors()
        self.ctx = llama.llama_init_from_model(model.ptr, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create an embedding context for {model.path}: "
                               f"{LOG.pop_errors() or 'no reason given'}")
        self._batch = llama.llama_batch_init(n_tokens, 0, 1)
        self.n_tokens = llama.llama_n_batch(self.ctx)
        self.n_embd = llama.llama_model_n_embd_out(model.ptr)
        self.pooling_type = llama.llama_pooling_type(self.ctx)
        if self.pooling_type not in POOLING_TYPES:
            self.close()
            raise ValueError(f"{model.name} pools as a reranker (pooling type {self.pooling_type}), not into "
                             "embeddings: pass another pooling_type")

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        """The embedding of the text `tokens` (1 to `n_tokens` of them): float32 [n_embd] when the
        context pools, else [len(tokens), n_embd], a vector per token."""
        n = len(tokens)
        if not 0 < n <= self.n_tokens:
            raise ValueError(f"an embedded text has 1 to {self.n_tokens} tokens (got {n})")
        memory = llama.llama_get_memory(self.ctx)
        if memory:  # a model with non-causal attention may have none
            llama.llama_memory_clear(memory, True)
        b = self._batch
        b.n_tokens = n
        for i, token in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, i, 1, True
            b.seq_id[i][0] = SEQ
        rc = llama.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} while embedding {n} tokens: "
                               f"{LOG.pop_errors() or 'no reason given'}")
        if self.pooling_type == POOLING_NONE:
            rows = np.ctypeslib.as_array(llama.llama_get_embeddings(self.ctx), shape=(n, self.n_embd))
        else:
            rows = np.ctypeslib.as_array(llama.llama_get_embeddings_seq(self.ctx, SEQ), shape=(self.n_embd,))
        return rows.copy()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama.llama_batch_free(self._batch)
            llama.llama_free(self.ctx)
            self.ctx = None

