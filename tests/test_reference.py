"""Compare the patched llama.cpp's attention-score capture with the independent NumPy reference."""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import pytest

from reference_forward import ReferenceModel

PROMPT = (
    b"The history of the printing press begins in the fifteenth century, when Johannes "
    b"Gutenberg combined movable metal type, oil-based ink and a wooden screw press. Within "
    b"a few decades, printed books spread across Europe and changed how knowledge travelled."
)
N_WINDOW = 16


def _llama_cpp_scores(model_path: str, text: bytes, n_window: int, flash_attn: int):
    """Tokenize `text`, decode it as one batch with capture on, and return
    (tokens, scores [n_layer, n_tokens], last-token logits, n_head) from the patched llama.cpp."""
    try:
        from llama_cpp import llama_cpp as L
    except Exception as e:  # pragma: no cover - environment problem
        pytest.fail(f"cannot import llama_cpp (patched build; set LLAMA_CPP_LIB_PATH): {e}")
    lib = L._lib
    if not hasattr(lib, "llama_attn_capture_set"):
        pytest.fail("the loaded libllama has no llama_attn_capture_* (not the patched build)")
    lib.llama_attn_capture_set.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32]
    lib.llama_attn_capture_set.restype = ctypes.c_int32
    lib.llama_attn_capture_get.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float), ctypes.c_int32]
    lib.llama_attn_capture_get.restype = ctypes.c_int32
    lib.llama_attn_capture_n_queries.argtypes = [ctypes.c_void_p]
    lib.llama_attn_capture_n_queries.restype = ctypes.c_int32

    global _log_cb  # keep the callback alive: llama.cpp holds the pointer
    _log_cb = L.llama_log_callback(lambda level, msg, data: None)
    L.llama_log_set(_log_cb, ctypes.c_void_p(0))
    L.llama_backend_init()

    model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
    assert model, "llama.cpp failed to load the model"
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 512, 512, 512
    cp.n_threads = cp.n_threads_batch = 2
    cp.flash_attn_type = flash_attn
    ctx = L.llama_init_from_model(model, cp)
    assert ctx, "llama.cpp failed to create a context"
    try:
        vocab = L.llama_model_get_vocab(model)
        buf = (L.llama_token * 512)()
        n = L.llama_tokenize(vocab, text, len(text), buf, 512, True, False)
        assert 0 < n <= 512
        tokens = list(buf[:n])
        assert lib.llama_attn_capture_set(ctx, n_window, None, 0) == 0

        batch = L.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1
            assert L.llama_decode(ctx, batch) == 0, "llama_decode failed"
        finally:
            L.llama_batch_free(batch)
        assert lib.llama_attn_capture_n_queries(ctx) == min(n_window, n)

        n_layer = L.llama_model_n_layer(model)
        m = lib.llama_attn_capture_get(ctx, 0, None, None, 0)
        assert m == n, f"capture reports {m} cells for {n} tokens"
        pos = (ctypes.c_int32 * m)()
        sc = (ctypes.c_float * (m * n_layer))()
        assert lib.llama_attn_capture_get(ctx, 0, pos, sc, m) == m
        assert list(pos) == list(range(n))
        scores = np.ctypeslib.as_array(sc).reshape(n_layer, m).astype(np.float64)
        n_vocab = L.llama_vocab_n_tokens(vocab)
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
        return tokens, scores, logits, L.llama_model_n_head(model)
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)


_reference_cache: dict = {}


@pytest.fixture(scope="module")
def model_path(default_model):
    """The default model, or INFMLLM_TEST_MODEL (another llama-architecture GGUF) when set."""
    path = os.environ.get("INFMLLM_TEST_MODEL", str(default_model))
    if not os.path.isfile(path):
        pytest.fail(f"INFMLLM_TEST_MODEL={path} is not a file")
    return path


@pytest.fixture(scope="module")
def reference_model(model_path):
    return ReferenceModel(model_path)


@pytest.mark.parametrize("flash_attn", [0, 1], ids=["fa_off", "fa_on"])
def test_reference_matches_llama_cpp(model_path, reference_model, flash_attn):
    tokens, cpp_scores, cpp_logits, n_head = _llama_cpp_scores(model_path, PROMPT, N_WINDOW, flash_attn)
    assert 40 <= len(tokens) <= 64, len(tokens)
    assert n_head == reference_model.n_head

    t0 = time.time()
    key = (tuple(tokens), N_WINDOW)
    if key not in _reference_cache:  # both flash-attention modes see the same tokens
        _reference_cache[key] = reference_model.forward(tokens, N_WINDOW)
    ref_scores, ref_logits = _reference_cache[key]
    elapsed = time.time() - t0
    assert ref_scores.shape == cpp_scores.shape == (reference_model.n_layer, len(tokens))

    expected_sum = N_WINDOW * reference_model.n_head
    np.testing.assert_allclose(ref_scores.sum(axis=1), expected_sum, rtol=1e-4)
    np.testing.assert_allclose(cpp_scores.sum(axis=1), expected_sum, rtol=1e-3)

    corr = np.array([np.corrcoef(r, c)[0, 1] for r, c in zip(ref_scores, cpp_scores)])
    print(f"\nflash_attn={flash_attn} n_tokens={len(tokens)} reference forward {elapsed:.2f}s; "
          f"per-layer Pearson min {corr.min():.6f} (layer {corr.argmin()}) mean {corr.mean():.6f}")
    assert corr.min() >= 0.999, f"per-layer correlations: {np.round(corr, 5).tolist()}"

    logit_corr = np.corrcoef(ref_logits, cpp_logits)[0, 1]
    print(f"logits: argmax ref {ref_logits.argmax()} llama.cpp {cpp_logits.argmax()}, corr {logit_corr:.6f}")
    assert ref_logits.argmax() == cpp_logits.argmax() or logit_corr > 0.99
