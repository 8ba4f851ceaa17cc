"""Attention probabilities (and layer outputs) read from llama.cpp's own forward pass through its eval callback.

The reference for the architecture matrix: a context with capture off and flash attention off
computes each attention layer's softmax ("kq_soft_max-<il>", [n_kv, n_tokens, n_head]) as part of
the model's forward pass; the callback copies it out. Summed over heads and the batch's last
`n_window` queries it is what the patch's capture must report, computed without the capture's
side branch, window slicing or accumulation by position.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from llama_cpp import llama_cpp as L

_ggml = ctypes.CDLL(str(Path(L._lib._name).parent / "libggml-base.so"))
_ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml.ggml_get_name.restype = ctypes.c_char_p
_ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
_ggml.ggml_nbytes.restype = ctypes.c_size_t
_ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_NE_OFFSET = 16  # struct ggml_tensor { enum ggml_type type; ggml_backend_buffer * buffer; int64_t ne[4]; ...}
_PREFIX = b"kq_soft_max-"


def _ne(t: int) -> tuple[int, ...]:
    return tuple((ctypes.c_int64 * 4).from_address(t + _NE_OFFSET))


def softmax_scores(model_path: str | Path, tokens: list[int], n_window: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Decode `tokens` as one batch at positions 0..n-1 in a fresh context; return, per layer that
    has attention, the attention its last `n_window` queries gave each of the n cells (summed over
    heads), and the last token's logits."""
    seen: dict[int, np.ndarray] = {}

    def callback(t, ask, _user):
        name = _ggml.ggml_get_name(t) or b""
        if not name.startswith(_PREFIX):
            return False if ask else True
        if ask:
            return True
        ne = _ne(t)
        data = np.empty(_ggml.ggml_nbytes(t) // 4, dtype=np.float32)
        _ggml.ggml_backend_tensor_get(t, data.ctypes.data, 0, data.nbytes)
        probs = data.reshape(ne[3], ne[2], ne[1], ne[0])  # [stream, head, query, cell]
        seen[int(name[len(_PREFIX):])] = probs[0, :, -n_window:, :len(tokens)].sum(axis=(0, 1)).astype(np.float64)
        return True

    logits = _decode_once(model_path, tokens, callback)
    return seen, logits


def _decode_once(model_path: str | Path, tokens: list[int], callback) -> np.ndarray:
    """Decode `tokens` as one batch at positions 0..n-1 in a fresh context (flash attention off)
    whose eval callback is `callback`; return the last token's logits."""
    cb = L.ggml_backend_sched_eval_callback(callback)
    model = L.llama_model_load_from_file(str(model_path).encode(), L.llama_model_default_params())
    assert model, f"llama.cpp could not load {model_path}"
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(256, len(tokens))
    cp.n_seq_max = 1
    cp.n_threads = cp.n_threads_batch = 2
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.cb_eval, cp.cb_eval_user_data = cb, None
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(len(tokens), 0, 1)
    try:
        assert ctx, "llama.cpp could not create a context"
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, i == len(tokens) - 1
            batch.seq_id[i][0] = 0
        assert L.llama_decode(ctx, batch) == 0
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
    finally:
        L.llama_batch_free(batch)
        if ctx:
            L.llama_free(ctx)
        L.llama_model_free(model)
    return logits


def layer_outputs(model_path: str | Path, tokens: list[int], layer: int) -> np.ndarray:
    """Decode `tokens` as one batch in a fresh context; return layer `layer`'s output ("l_out-<il>"),
    float32 [n_tokens, n_embd]."""
    name, seen = f"l_out-{layer}".encode(), []

    def callback(t, ask, _user):
        if (_ggml.ggml_get_name(t) or b"") != name:
            return False if ask else True
        if not ask:
            ne = _ne(t)
            data = np.empty(ne[1] * ne[0], dtype=np.float32)
            _ggml.ggml_backend_tensor_get(t, data.ctypes.data, 0, data.nbytes)
            seen.append(data.reshape(ne[1], ne[0]))
        return True

    _decode_once(model_path, tokens, callback)
    return np.concatenate(seen)
