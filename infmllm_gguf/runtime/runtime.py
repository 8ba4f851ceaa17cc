"""One llama.cpp context decoding one sequence over a `Model`, through llama-cpp-python's ctypes API.

`Runtime` is the small surface the rest of the package needs: decode a batch of tokens or input
embeddings at given positions, read logits, edit the KV cache (remove and shift positions), capture
attention scores through the patch (`capture_scores` / `read_scores`), and save or load its state.
"""
from __future__ import annotations

import ctypes
import os
from typing import Sequence

import numpy as np
from llama_cpp import llama_cpp as llama

from . import native
from .capture import AttentionCapture, CaptureError
from .cell_state import SEQ, CellState
from .closing import Closing
from .log import LOG
from .model import Model

#: KV cache element types, named as llama.cpp's tools name them (--cache-type-k/-v)
CACHE_TYPES = {"f16": llama.GGML_TYPE_F16, "q8_0": llama.GGML_TYPE_Q8_0, "q4_0": llama.GGML_TYPE_Q4_0}


def check_cache_types(type_k: str, type_v: str, flash_attn: bool | None) -> None:
    """ValueError, naming the fix, for a cache type llama.cpp would refuse."""
    for flag, name in (("--cache-type-k", type_k), ("--cache-type-v", type_v)):
        if name not in CACHE_TYPES:
            raise ValueError(f"{flag} must be one of {', '.join(CACHE_TYPES)} (got {name!r})")
    if type_v != "f16" and flash_attn is False:
        raise ValueError(f"a quantized V cache (--cache-type-v {type_v}) needs flash attention, as in llama.cpp: "
                         "drop --no-flash-attn or use --cache-type-v f16")


def new_context(model: Model, *, n_ctx: int, n_batch: int | None = None, n_ubatch: int | None = None,
                flash_attn: bool | None = None, n_threads: int | None = None, cache_type_k: str = "f16",
                cache_type_v: str = "f16", eval_callback=None) -> llama.llama_context_p:
    """A llama.cpp context for one sequence of `model` (see `Runtime`); RuntimeError with llama.cpp's
    reason if it cannot be made. The caller frees it, and keeps `eval_callback` (a
    `ggml_backend_sched_eval_callback` that sees the forward pass's tensors) alive as long."""
    cparams = llama.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch or n_ctx
    cparams.n_ubatch = n_ubatch or min(cparams.n_batch, 512)
    cparams.n_seq_max = 1
    cparams.type_k, cparams.type_v = CACHE_TYPES[cache_type_k], CACHE_TYPES[cache_type_v]
    cparams.flash_attn_type = {None: llama.LLAMA_FLASH_ATTN_TYPE_AUTO, True: llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                               False: llama.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
    # with no layer on the GPU, keep every op on the CPU (llama.cpp would offload large batches)
    cparams.offload_kqv = cparams.op_offload = model.n_gpu_layers != 0
    threads = n_threads or max(1, os.cpu_count() or 1)
    cparams.n_threads = cparams.n_threads_batch = threads
    if eval_callback is not None:
        cparams.cb_eval, cparams.cb_eval_user_data = eval_callback, None
    ctx = llama.llama_init_from_model(model.ptr, cparams)
    if not ctx:
        reason = LOG.pop_errors() or "no reason given"
        raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} cells for {model.path}: {reason}")
    return ctx


class Runtime(AttentionCapture, CellState, Closing):
    """A llama.cpp context of `n_ctx` cells decoding one sequence with `model` (a `Model`, or a
    path to load one from, which the runtime then owns and frees). `cache_type_k`/`cache_type_v`:
    the KV cache's element types (`CACHE_TYPES`); a quantized V needs flash attention.
    `eval_callback`: llama.cpp's `ggml_backend_sched_eval_callback`, shown the forward pass's
    tensors (the memory's `hidden` ranking reads one layer's output with it)."""

    def __init__(self, model: Model | str | os.PathLike | None = None, *, n_ctx: int = 2048,
                 n_batch: int | None = None, n_ubatch: int | None = None, n_gpu_layers: int = -1,
                 flash_attn: bool | None = None, n_threads: int | None = None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", eval_callback=None):
        check_cache_types(cache_type_k, cache_type_v, flash_attn)
        self._eval_callback = eval_callback  # llama.cpp calls it while the context lives
        self.cache_types = (cache_type_k, cache_type_v)
        self._owns_model = not isinstance(model, Model)
        self.model = Model(model, n_gpu_layers=n_gpu_layers) if self._owns_model else model
        try:
            self.ctx = new_context(self.model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, flash_attn=flash_attn,
                                   n_threads=n_threads, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                                   eval_callback=eval_callback)
        except RuntimeError:
            self._close_model()
            raise
        self.kv = llama.llama_get_memory(self.ctx)  # llama.cpp's memory handle: the KV cache
        self.n_ctx = llama.llama_n_ctx(self.ctx)
        self.n_batch = llama.llama_n_batch(self.ctx)
        self.n_ubatch = llama.llama_n_ubatch(self.ctx)
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self._embd_batch = None  # a batch of embeddings (images), made on first use
        self.kv_layers = self._read_kv_layers()  # the layers that have a KV cache (attention layers)
        self._captured_queries = 0
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
        self._close_model()

    def _close_model(self) -> None:
        if getattr(self, "_owns_model", False) and getattr(self, "model", None) is not None:
            self.model.close()
            self.model = None


    # -- decoding ---------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int], positions: Sequence[int] | None = None, *,
               logits: str = "last") -> None:
        """Decode token ids `tokens` (one batch) at `positions` (default: after the sequence's last
        position). logits: "last" (only the last token's), "all", or "none"."""
        n = self._check_batch(len(tokens))
        for i, tok in enumerate(tokens):
            self._batch.token[i] = tok
        self._submit(self._batch, n, positions, logits)

    def decode_embeddings(self, embd: np.ndarray, positions: Sequence[int] | np.ndarray | None = None, *,
                          logits: str = "last") -> None:
        """Decode input embeddings (float32 [n, n_embd_inp], e.g. an image's from libmtmd) as one
        batch, like `decode` does tokens. `positions`: one per row, or for an M-RoPE model an int
        array [4, n] of each row's time, height, width and fourth position (`layout.image_layout`)."""
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        n_embd = self.model.n_embd_inp
        if embd.ndim != 2 or embd.shape[1] != n_embd:
            raise ValueError(f"embeddings must be [n, {n_embd}] for this model (got shape {embd.shape})")
        if not np.all(np.isfinite(embd)):
            raise ValueError("embeddings have non-finite values")
        n = self._check_batch(embd.shape[0])
        if self._embd_batch is None:
            # llama_batch_init with embd > 0 allocates `embd` instead of `token`
            self._embd_batch = llama.llama_batch_init(self.n_batch, n_embd, 1)
        ctypes.memmove(self._embd_batch.embd, embd.ctypes.data, embd.nbytes)
        if positions is None or np.ndim(positions) == 1:
            self._submit(self._embd_batch, n, positions, logits)
            return
        axes = np.ascontiguousarray(positions, dtype=np.int32)
        if axes.shape != (4, n) or not self.model.multi_axis_rope:
            raise ValueError(f"positions of shape {axes.shape}: an M-RoPE model takes [4, {n}], others one per row")
        # llama.cpp reads an embedding batch's M-RoPE positions section-major, pos[axis*n + i]:
        # the batch's own array holds n_batch, so it points at a larger one for this call
        buf = (llama.llama_pos * axes.size)()
        ctypes.memmove(buf, axes.ctypes.data, axes.nbytes)
        own = ctypes.cast(self._embd_batch.pos, ctypes.c_void_p).value  # an address: the field itself would follow
        self._embd_batch.pos = ctypes.cast(buf, ctypes.POINTER(llama.llama_pos))
        try:
            self._submit(self._embd_batch, n, axes[0], logits)
        finally:
            self._embd_batch.pos = ctypes.cast(own, ctypes.POINTER(llama.llama_pos))  # llama_batch_free frees it

    def set_causal_attention(self, causal: bool) -> None:
        """Causal (the default) or full attention inside the next batches (Gemma 3's images)."""
        llama.llama_set_causal_attn(self.ctx, causal)

    def _check_batch(self, n: int) -> int:
        if n == 0:
            raise ValueError("decode needs at least one token")
        if n > self.n_batch:
            raise ValueError(f"a batch of {n} tokens exceeds this context's n_batch={self.n_batch}")
        if 0 < self._captured_queries and n < self._captured_queries:
            raise ValueError(f"the capture takes the last {self._captured_queries} queries, more than the batch "
                             f"({n} tokens); decode at least {self._captured_queries} tokens or capture fewer")
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
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def all_logits(self, n_outputs: int) -> np.ndarray:
        """A copy of the logits of the last decode's `n_outputs` outputs, in batch order
        (float32 [n_outputs, n_vocab]); the decode must have asked for logits="all"."""
        ptr = llama.llama_get_logits_ith(self.ctx, n_outputs - 1)  # validates n_outputs
        if not ptr:
            raise RuntimeError(f"the last decode has fewer than {n_outputs} outputs")
        return np.ctypeslib.as_array(llama.llama_get_logits(self.ctx), shape=(n_outputs, self.model.n_vocab)).copy()

    # -- KV cache ---------------------------------------------------------------------------
    def pos_min(self) -> int:
        """Smallest position of the sequence (of the sliding-window cache, for iSWA models)."""
        return llama.llama_memory_seq_pos_min(self.kv, SEQ)

    def pos_max(self) -> int:
        return llama.llama_memory_seq_pos_max(self.kv, SEQ)

    def n_cached(self) -> int:
        """Cells that the sequence occupies, as llama.cpp counts them."""
        n = native.llama_attn_capture_get(self.ctx, SEQ, None, None, 0)
        if n < 0:
            raise CaptureError(f"llama_attn_capture_get cannot count cells of this memory (code {n})")
        return n

    def remove(self, p0: int, p1: int) -> None:
        """Remove the cells at positions [p0, p1)."""
        if not llama.llama_memory_seq_rm(self.kv, SEQ, p0, p1):
            raise RuntimeError(f"llama.cpp refused to remove positions [{p0}, {p1})")

    def shift(self, p0: int, p1: int, delta: int) -> None:
        """Add `delta` to the positions in [p0, p1); the keys are re-rotated at the next decode."""
        llama.llama_memory_seq_add(self.kv, SEQ, p0, p1, delta)

    def compact(self, keep: np.ndarray) -> None:
        """Per-layer compaction: afterwards the cells 0..n_keep-1 of the i-th layer of `kv_layers` hold
        the tokens that were at positions `keep[i]` (int [len(kv_layers), n_keep], ascending per row),
        their keys re-rotated to positions 0..n_keep-1; the sequence occupies those positions and
        nothing else. A hybrid model's recurrent state stays as it is."""
        keep = np.asarray(keep)
        if keep.ndim != 2 or keep.shape[0] != len(self.kv_layers) or keep.shape[1] < 1:
            raise ValueError(f"keep must be [KV layers, n_keep] = [{len(self.kv_layers)}, *] (got shape {keep.shape})")
        rows = np.empty((self.model.n_layer, keep.shape[1]), dtype=np.int32)
        rows[:] = keep[0]  # layers without a KV cache: not read
        rows[list(self.kv_layers)] = keep
        rc = native.llama_attn_capture_compact(self.ctx, SEQ, rows.ctypes.data_as(ctypes.POINTER(llama.llama_pos)),
                                               keep.shape[1])
        if rc == -3:
            raise ValueError("per-layer compaction needs a plain or hybrid KV cache, not a sliding-window (iSWA) "
                             "or recurrent one")
        if rc == -5:
            self.clear()
            raise RuntimeError("llama.cpp failed to compute the compaction; the cache was cleared")
        if rc != 0:
            raise ValueError("llama.cpp refused the compaction: each row of keep must list, ascending, positions "
                             "that the sequence holds, one cell each (not an M-RoPE image's), and the positions "
                             "must be shiftable")

    def can_shift(self) -> bool:
        return bool(llama.llama_memory_can_shift(self.kv))

    def can_compact(self) -> bool:
        """Whether per-layer compaction (`compact`) applies: shiftable positions in a plain or hybrid
        cache with no sliding-window layers, keys stored whole (not MLA's compressed ones)."""
        return self.can_shift() and not self.model.sliding_window and not self.model.mla

    def clear(self) -> None:
        llama.llama_memory_clear(self.kv, True)
