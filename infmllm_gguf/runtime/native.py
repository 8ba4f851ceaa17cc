"""ctypes mirror of `include/llama-attn-capture.h`, the C API that `patches/` adds to llama.cpp.

Like llama-cpp-python's own `llama_cpp.py`, each binding carries its C prototype as a comment.
The functions live in the `libllama` that llama-cpp-python loaded; an unpatched build lacks
them, and calling a binding then raises `UnpatchedLlamaError` instead of crashing.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

from llama_cpp import llama_cpp as llama

__all__ = [
    "UnpatchedLlamaError",
    "is_patched",
    "llama_attn_capture_apply_shifts",
    "llama_attn_capture_compact",
    "llama_attn_capture_get",
    "llama_attn_capture_kv_layers",
    "llama_attn_capture_n_queries",
    "llama_attn_capture_set",
]


class UnpatchedLlamaError(RuntimeError):
    """The loaded libllama has no attention-capture API."""


def _missing(name: str) -> Callable[..., Any]:
    def raise_unpatched(*_args: Any) -> Any:
        raise UnpatchedLlamaError(
            f"the llama.cpp library loaded by llama-cpp-python ({llama._lib._name}) lacks {name}: it is not "
            "the patched build of infmllm-gguf. Run `make setup` (it builds llama-cpp-python 0.3.36 with "
            "patches/*.patch and installs it into .venv), or point LLAMA_CPP_LIB_PATH at a patched build.")
    return raise_unpatched


def _capture_function(name: str, argtypes: list[Any], restype: Any):
    """Bind `name` from libllama like llama_cpp's `ctypes_function`, tolerating an unpatched library."""
    def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
        func = getattr(llama._lib, name, None)
        if func is None:
            return functools.wraps(f)(_missing(name))
        func.argtypes = argtypes
        func.restype = restype
        return functools.wraps(f)(func)
    return decorator


# LLAMA_API int32_t llama_attn_capture_set(
#         struct llama_context * ctx,
#                      int32_t   n_window,
#                const int32_t * layers,
#                      int32_t   n_layers);
@_capture_function(
    "llama_attn_capture_set",
    [llama.llama_context_p_ctypes, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32],
    ctypes.c_int32,
)
def llama_attn_capture_set(ctx: llama.llama_context_p, n_window: int, layers: Any, n_layers: int, /) -> int:
    """Capture the attention of the last n_window queries of each decode (0: off); layers NULL = all."""
    ...


# LLAMA_API int32_t llama_attn_capture_n_queries(const struct llama_context * ctx);
@_capture_function("llama_attn_capture_n_queries", [llama.llama_context_p_ctypes], ctypes.c_int32)
def llama_attn_capture_n_queries(ctx: llama.llama_context_p, /) -> int:
    """Window queries captured by the last decode; -1 if it captured nothing."""
    ...


# LLAMA_API int32_t llama_attn_capture_get(
#         const struct llama_context * ctx,
#                       llama_seq_id   seq_id,
#                          llama_pos * pos,
#                              float * scores,
#                            int32_t   n_max);
@_capture_function(
    "llama_attn_capture_get",
    [llama.llama_context_p_ctypes, llama.llama_seq_id, ctypes.POINTER(llama.llama_pos),
     ctypes.POINTER(ctypes.c_float), ctypes.c_int32],
    ctypes.c_int32,
)
def llama_attn_capture_get(ctx: llama.llama_context_p, seq_id: int, pos: Any, scores: Any, n_max: int, /) -> int:
    """Positions of seq_id's cells and per-layer scores [n_layer][n]; returns n or a negative error."""
    ...


# LLAMA_API int32_t llama_attn_capture_compact(
#         struct llama_context * ctx,
#                 llama_seq_id   seq_id,
#            const llama_pos   * keep,
#                      int32_t   n_keep);
@_capture_function(
    "llama_attn_capture_compact",
    [llama.llama_context_p_ctypes, llama.llama_seq_id, ctypes.POINTER(llama.llama_pos), ctypes.c_int32],
    ctypes.c_int32,
)
def llama_attn_capture_compact(ctx: llama.llama_context_p, seq_id: int, keep: Any, n_keep: int, /) -> int:
    """Per layer, keep the tokens at positions keep[il*n_keep + j] in cells 0..n_keep-1 (keys re-rotated to j)."""
    ...


# LLAMA_API int32_t llama_attn_capture_kv_layers(
#         const struct llama_context * ctx,
#                            int32_t * layers,
#                            int32_t   n_max);
@_capture_function(
    "llama_attn_capture_kv_layers",
    [llama.llama_context_p_ctypes, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32],
    ctypes.c_int32,
)
def llama_attn_capture_kv_layers(ctx: llama.llama_context_p, layers: Any, n_max: int, /) -> int:
    """The layers that have a KV cache (not a hybrid model's recurrent ones); returns their number."""
    ...


# LLAMA_API int32_t llama_attn_capture_apply_shifts(struct llama_context * ctx);
@_capture_function("llama_attn_capture_apply_shifts", [llama.llama_context_p_ctypes], ctypes.c_int32)
def llama_attn_capture_apply_shifts(ctx: llama.llama_context_p, /) -> int:
    """Apply pending position shifts to the keys now (a saved state then holds them)."""
    ...


def is_patched() -> bool:
    return hasattr(llama._lib, "llama_attn_capture_set")
