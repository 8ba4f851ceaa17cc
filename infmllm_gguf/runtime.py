"""One llama.cpp model and context, through llama-cpp-python's low-level ctypes API.

`Runtime` is the small surface the rest of the package needs: tokenize, decode a batch of one
sequence at given positions, read logits, edit the KV cache (remove and shift positions), and
capture attention scores through the patch (`capture_scores` / `read_scores`).
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from llama_cpp import llama_cpp as llama

from . import native
from .models import diagnose_gguf, resolve_model
from .native_log import LOG

SEQ = 0  # the one sequence a Runtime decodes

llama.llama_backend_init()


class CaptureError(RuntimeError):
    """Scores were asked for but none were captured."""


@dataclass(frozen=True)
class AttentionScores:
    """Attention that the last decode's window of queries gave to each cached token.

    `scores[i, j]` is the attention probability that layer `layers[i]` gave to the cell at
    `positions[j]`, summed over heads and over the `n_queries` window queries.
    """

    positions: np.ndarray  # int32 [n]
    scores: np.ndarray     # float32 [len(layers), n]
    layers: tuple[int, ...]
    n_queries: int


class Runtime:
    """A llama.cpp model with one context of `n_ctx` cells decoding one sequence."""

    def __init__(self, model_path: str | os.PathLike | None = None, *, n_ctx: int = 2048,
                 n_batch: int | None = None, n_ubatch: int | None = None, n_gpu_layers: int = -1,
                 flash_attn: bool | None = None, n_threads: int | None = None):
        self.model_path: Path = resolve_model(model_path)
        mparams = llama.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        LOG.take()
        self.model = llama.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self.model:
            diagnose_gguf(self.model_path, LOG.take())
        self.vocab = llama.llama_model_get_vocab(self.model)

        cparams = llama.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch or n_ctx
        cparams.n_ubatch = n_ubatch or min(cparams.n_batch, 512)
        cparams.n_seq_max = 1
        cparams.flash_attn_type = {None: llama.LLAMA_FLASH_ATTN_TYPE_AUTO, True: llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   False: llama.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        # with no layer on the GPU, keep every op on the CPU (llama.cpp would offload large batches)
        cparams.offload_kqv = cparams.op_offload = n_gpu_layers != 0
        threads = n_threads or max(1, os.cpu_count() or 1)
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = llama.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama.llama_model_free(self.model)
            self.model = None
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} cells for {self.model_path}: "
                               f"{LOG.take() or 'no reason given'}")
        self.memory = llama.llama_get_memory(self.ctx)
        self.n_ctx = llama.llama_n_ctx(self.ctx)
        self.n_batch = llama.llama_n_batch(self.ctx)
        self.n_layer = llama.llama_model_n_layer(self.model)
        self.n_head = llama.llama_model_n_head(self.model)
        self.n_embd = llama.llama_model_n_embd(self.model)
        self.n_embd_inp = llama.llama_model_n_embd_inp(self.model)  # what an input embedding holds
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama.llama_model_n_ctx_train(self.model)
        self.n_swa = llama.llama_model_n_swa(self.model)  # sliding window (0: none)
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self._embd_batch = None  # a batch of embeddings (images), made on first use
        self._capture_window = 0
        self._capture_layers: tuple[int, ...] = ()
        self._has_logits = False
        self._restored_logits: np.ndarray | None = None  # llama.cpp's state does not carry logits

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama.llama_batch_free(self._batch)
            if self._embd_batch is not None:
                llama.llama_batch_free(self._embd_batch)
            llama.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- text -------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama.llama_token * cap)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            buf = (llama.llama_token * -n)()
            n = llama.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def token_piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n].decode("utf-8", errors="replace")

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int], positions: Sequence[int] | None = None, *,
               logits: str = "last") -> None:
        """Decode `tokens` (one batch) at `positions` (default: after the sequence's last position).

        logits: "last" (only the last token's), "all", or "none".
        """
        n = self._check_batch(len(tokens))
        for i, tok in enumerate(tokens):
            self._batch.token[i] = tok
        self._submit(self._batch, n, positions, logits)

    def decode_embeddings(self, embd: np.ndarray, positions: Sequence[int] | None = None, *,
                          logits: str = "last") -> None:
        """Decode input embeddings (float32 [n, n_embd_inp], e.g. an image's from libmtmd) as one
        batch, like `decode` does tokens."""
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        if embd.ndim != 2 or embd.shape[1] != self.n_embd_inp:
            raise ValueError(f"embeddings must be [n, {self.n_embd_inp}] for this model (got shape {embd.shape})")
        if not np.all(np.isfinite(embd)):
            raise ValueError("embeddings have non-finite values")
        n = self._check_batch(embd.shape[0])
        if self._embd_batch is None:
            # llama_batch_init with embd > 0 allocates `embd` instead of `token`
            self._embd_batch = llama.llama_batch_init(self.n_batch, self.n_embd_inp, 1)
        ctypes.memmove(self._embd_batch.embd, embd.ctypes.data, embd.nbytes)
        self._submit(self._embd_batch, n, positions, logits)

    def _check_batch(self, n: int) -> int:
        if n == 0:
            raise ValueError("decode needs at least one token")
        if n > self.n_batch:
            raise ValueError(f"a batch of {n} tokens exceeds this context's n_batch={self.n_batch}")
        if 0 < self._capture_window and n < self._capture_window:
            raise ValueError(f"the capture window ({self._capture_window} queries) is larger than the batch "
                             f"({n} tokens); decode at least {self._capture_window} tokens or use a smaller window")
        return n

    def _submit(self, b, n: int, positions: Sequence[int] | None, logits: str) -> None:
        """Set positions, sequence and output flags of the first `n` entries of batch `b` and decode it."""
        if positions is None:
            start = self.pos_max() + 1
            positions = range(start, start + n)
        b.n_tokens = n
        for i, pos in zip(range(n), positions):
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = SEQ
            b.logits[i] = logits == "all" or (logits == "last" and i == n - 1)
        self._restored_logits = None
        rc = llama.llama_decode(self.ctx, b)
        self._has_logits = rc == 0 and logits != "none"
        if rc == 1:
            raise RuntimeError(f"the KV cache has no room for {n} more tokens ({self.n_cached()} of "
                               f"{self.n_ctx} cells used)")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def logits(self, i: int = -1) -> np.ndarray:
        """A copy of the logits of output `i` of the last decode."""
        if self._restored_logits is not None and i in (0, -1):
            return self._restored_logits.copy()
        ptr = llama.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise RuntimeError(f"no logits for output {i} of the last decode")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def all_logits(self, n_outputs: int) -> np.ndarray:
        """A copy of the logits of the last decode's `n_outputs` outputs, in batch order
        (float32 [n_outputs, n_vocab]); the decode must have asked for logits="all"."""
        ptr = llama.llama_get_logits_ith(self.ctx, n_outputs - 1)  # validates n_outputs
        if not ptr:
            raise RuntimeError(f"the last decode has fewer than {n_outputs} outputs")
        return np.ctypeslib.as_array(llama.llama_get_logits(self.ctx), shape=(n_outputs, self.n_vocab)).copy()

    # -- saving -----------------------------------------------------------------------------
    def get_state(self) -> tuple[np.ndarray, np.ndarray | None]:
        """llama.cpp's context state (the cells) as bytes (uint8 [n]), and the last output's logits
        (None before any decode with logits), which llama.cpp's state does not include."""
        self.settle()
        size = llama.llama_state_get_size(self.ctx)
        buf = np.empty(size, dtype=np.uint8)
        written = llama.llama_state_get_data(self.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size)
        if written != size:
            raise RuntimeError(f"llama_state_get_data wrote {written} of {size} bytes")
        return buf, (self.logits() if self._has_logits else None)

    def settle(self) -> None:
        """Apply pending position shifts to the keys now. llama.cpp re-rotates shifted keys lazily, at
        the next decode, and its saved state would lose the pending shift: decode one throwaway token
        after the sequence and remove it. The last logits survive."""
        last = self.logits() if self._has_logits else None
        window, layers = self._capture_window, self._capture_layers
        if window:
            self.capture_scores(0)
        pos = self.pos_max() + 1
        self.decode([0], [pos], logits="none")
        self.remove(pos, pos + 1)
        if window:
            self.capture_scores(window, None if len(layers) == self.n_layer else layers)
        self._restored_logits, self._has_logits = last, last is not None

    def set_state(self, data: np.ndarray, last_logits: np.ndarray | None) -> None:
        """Load a state from `get_state` of a context of the same model and size."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        read = llama.llama_state_set_data(self.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), data.size)
        if read != data.size:
            self.clear()
            raise ValueError(f"llama.cpp could not load the saved cache ({read} of {data.size} bytes read): "
                             "it was saved from another model or context size")
        if last_logits is not None and last_logits.shape != (self.n_vocab,):
            raise ValueError(f"saved logits have shape {last_logits.shape}, this model's vocabulary {self.n_vocab}")
        self._restored_logits = None if last_logits is None else last_logits.astype(np.float32)
        self._has_logits = last_logits is not None

    # -- KV cache ---------------------------------------------------------------------------
    def pos_min(self) -> int:
        """Smallest position of the sequence (of the sliding-window cache, for iSWA models)."""
        return llama.llama_memory_seq_pos_min(self.memory, SEQ)

    def pos_max(self) -> int:
        return llama.llama_memory_seq_pos_max(self.memory, SEQ)

    def n_cached(self) -> int:
        """Cells that the sequence occupies, as llama.cpp counts them."""
        n = native.llama_attn_capture_get(self.ctx, SEQ, None, None, 0)
        if n < 0:
            raise CaptureError(f"llama_attn_capture_get cannot count cells of this memory (code {n})")
        return n

    def remove(self, p0: int, p1: int) -> None:
        """Remove the cells at positions [p0, p1)."""
        if not llama.llama_memory_seq_rm(self.memory, SEQ, p0, p1):
            raise RuntimeError(f"llama.cpp refused to remove positions [{p0}, {p1})")

    def shift(self, p0: int, p1: int, delta: int) -> None:
        """Add `delta` to the positions in [p0, p1); the keys are re-rotated at the next decode."""
        llama.llama_memory_seq_add(self.memory, SEQ, p0, p1, delta)

    def can_shift(self) -> bool:
        return bool(llama.llama_memory_can_shift(self.memory))

    def clear(self) -> None:
        llama.llama_memory_clear(self.memory, True)

    # -- attention capture ------------------------------------------------------------------
    def capture_scores(self, window: int, layers: Sequence[int] | None = None) -> None:
        """Capture, at every following decode, the attention of its last `window` queries (0: off)."""
        if window < 0:
            raise ValueError(f"the capture window must be >= 0, not {window}")
        if layers is None:
            rc = native.llama_attn_capture_set(self.ctx, window, None, 0)
        else:
            if not layers:
                raise ValueError("layers must name at least one layer (or be None for all)")
            arr = (ctypes.c_int32 * len(layers))(*layers)
            rc = native.llama_attn_capture_set(self.ctx, window, arr, len(layers))
        if rc != 0:
            raise ValueError(f"invalid capture layers {list(layers or [])} for a model of {self.n_layer} layers")
        self._capture_window = window
        self._capture_layers = tuple(range(self.n_layer)) if layers is None else tuple(sorted(set(layers)))

    def read_scores(self) -> AttentionScores:
        """The scores captured by the last decode, for the cells the sequence occupies now."""
        n = native.llama_attn_capture_get(self.ctx, SEQ, None, None, 0)
        if native.llama_attn_capture_n_queries(self.ctx) < 0:
            raise CaptureError("no attention scores were captured: call capture_scores(window) before decoding")
        if n == -3:
            raise CaptureError("attention capture needs a KV cache; recurrent and hybrid models have none")
        if n < 0:
            raise CaptureError(f"llama_attn_capture_get failed with code {n}")
        positions = np.zeros(n, dtype=np.int32)
        scores = np.zeros((self.n_layer, n), dtype=np.float32)
        rc = native.llama_attn_capture_get(
            self.ctx, SEQ, positions.ctypes.data_as(ctypes.POINTER(llama.llama_pos)),
            scores.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        if rc != n:
            raise CaptureError(f"llama_attn_capture_get returned {rc}, expected {n}")
        layers = self._capture_layers
        return AttentionScores(positions, scores[list(layers)], layers,
                               native.llama_attn_capture_n_queries(self.ctx))
