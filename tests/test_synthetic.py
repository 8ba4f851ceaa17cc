"""Tests of infmllm_gguf.synthetic: random-weight GGUF models that llama.cpp loads and runs."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses

import numpy as np
import pytest

import llama_cpp  # noqa: F401  (resolves the shared library)
from llama_cpp import llama_cpp as L

import gguf
from infmllm_gguf.synthetic import SHAPES, ModelShape, main, tokenizer_vocab, write_model

TEXT = (b"The quick brown fox jumps over the lazy dog. Pack my box with five dozen "
        b"liquor jugs! 0123456789 (x + y) * z = 42; <tag> {a: [1, 2]} ~ `q` | end.\n")


# ---------------------------------------------------------------------------------------------
# helpers

@pytest.fixture(scope="module", autouse=True)
def _backend():
    L.llama_backend_init()
    yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Lazily written models, one per (shape, dtype), shared by the module's tests."""
    root = tmp_path_factory.mktemp("synthetic")
    cache: dict[tuple[str, str], object] = {}

    def get(shape: str, dtype: str):
        key = (shape, dtype)
        if key not in cache:
            cache[key] = write_model(root / f"{shape}-{dtype}.gguf", shape, dtype=dtype)
        return cache[key]

    return get


@contextlib.contextmanager
def load(path, *, n_ctx=256, n_batch=128, swa_full=True, vocab_only=False):
    mp = L.llama_model_default_params()
    mp.vocab_only = vocab_only
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama.cpp failed to load {path}"
    ctx = None
    try:
        if not vocab_only:
            cp = L.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
            cp.n_threads = cp.n_threads_batch = 2
            cp.swa_full = swa_full
            ctx = L.llama_init_from_model(model, cp)
            assert ctx, "llama_init_from_model failed"
        yield model, ctx
    finally:
        if ctx:
            L.llama_free(ctx)
        L.llama_model_free(model)


def tokenize(model, text: bytes, add_bos=True) -> list[int]:
    vocab = L.llama_model_get_vocab(model)
    buf = (L.llama_token * (len(text) + 8))()
    n = L.llama_tokenize(vocab, text, len(text), buf, len(buf), add_bos, False)
    assert n > 0
    return list(buf[:n])


def detokenize(model, tokens: list[int]) -> bytes:
    vocab = L.llama_model_get_vocab(model)
    arr = (L.llama_token * len(tokens))(*tokens)
    out = ctypes.create_string_buffer(8 * len(tokens) + 64)
    n = L.llama_detokenize(vocab, arr, len(tokens), out, len(out), True, False)
    assert n >= 0
    return out.raw[:n]


def decode(model, ctx, tokens: list[int]) -> np.ndarray:
    """Decode tokens at positions 0.. in one batch, from an empty cache; logits of every token,
    [n, n_vocab]."""
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    n = len(tokens)
    batch = L.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        assert L.llama_decode(ctx, batch) == 0
    finally:
        L.llama_batch_free(batch)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(n, n_vocab)).copy()


def meta(model, key: str) -> str:
    buf = ctypes.create_string_buffer(256)
    n = L.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else ""


@pytest.fixture(scope="module")
def capture():
    """The patched attention-capture API (include/llama-attn-capture.h)."""
    lib = L._lib
    if not hasattr(lib, "llama_attn_capture_set"):
        pytest.skip("this libllama is not the infmllm-gguf patched build (no llama_attn_capture_*)")
    lib.llama_attn_capture_set.argtypes = [ctypes.c_void_p, ctypes.c_int32,
                                           ctypes.POINTER(ctypes.c_int32), ctypes.c_int32]
    lib.llama_attn_capture_set.restype = ctypes.c_int32
    lib.llama_attn_capture_get.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32),
                                           ctypes.POINTER(ctypes.c_float), ctypes.c_int32]
    lib.llama_attn_capture_get.restype = ctypes.c_int32
    lib.llama_attn_capture_n_queries.argtypes = [ctypes.c_void_p]
    lib.llama_attn_capture_n_queries.restype = ctypes.c_int32

    def run(model, ctx, tokens: list[int], n_window: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions [n], scores [n_layer, n]) of the last n_window queries of one batch."""
        assert lib.llama_attn_capture_set(ctx, n_window, None, 0) == 0
        decode(model, ctx, tokens)
        assert lib.llama_attn_capture_n_queries(ctx) == n_window
        n = lib.llama_attn_capture_get(ctx, 0, None, None, 0)
        assert n == len(tokens)
        n_layer = L.llama_model_n_layer(model)
        pos = (ctypes.c_int32 * n)()
        sc = (ctypes.c_float * (n_layer * n))()
        assert lib.llama_attn_capture_get(ctx, 0, pos, sc, n) == n
        return np.array(pos), np.ctypeslib.as_array(sc).reshape(n_layer, n).copy()

    return run


def long_tokens(model, n: int) -> list[int]:
    toks = tokenize(model, TEXT * 8)
    assert len(toks) >= n
    return toks[:n]


# ---------------------------------------------------------------------------------------------
# shapes and file contents

def test_named_shapes():
    s = SHAPES["llama-1b"]  # TinyLlama-1.1B
    assert (s.arch, s.n_vocab, s.n_embd, s.n_layer, s.n_head, s.n_head_kv, s.n_ff) == \
        ("llama", 32000, 2048, 22, 32, 4, 5632)
    assert s.n_params == 1_100_048_384
    s = SHAPES["llama-7b"]  # Llama-2-7B
    assert (s.arch, s.n_vocab, s.n_embd, s.n_layer, s.n_head, s.n_head_kv, s.n_ff) == \
        ("llama", 32000, 4096, 32, 32, 32, 11008)
    assert s.n_params == 6_738_415_616
    t = SHAPES["tiny-gemma3-swa"]
    assert t.arch == "gemma3" and t.sliding_window
    assert t.swa_layers and len(t.swa_layers) < t.n_layer  # both kinds of layer
    assert SHAPES["tiny-llama"].swa_layers == []


def test_shape_validation():
    with pytest.raises(ValueError):
        ModelShape(arch="mistral", n_vocab=512, n_embd=64, n_layer=1, n_head=4, n_head_kv=2, n_ff=128)
    with pytest.raises(ValueError):  # GQA needs n_head % n_head_kv == 0
        dataclasses.replace(SHAPES["tiny-llama"], n_head_kv=3)
    with pytest.raises(ValueError):  # sliding window is gemma3-only
        dataclasses.replace(SHAPES["tiny-llama"], sliding_window=16)
    with pytest.raises(ValueError):  # specials + bytes do not fit
        dataclasses.replace(SHAPES["tiny-llama"], n_vocab=200)
    with pytest.raises(KeyError):
        write_model("/nonexistent/x.gguf", "no-such-shape")
    with pytest.raises(ValueError):
        write_model("/nonexistent/x.gguf", "tiny-llama", dtype="q5_k")


def test_tokenizer_vocab_layout():
    tokens, scores, types = tokenizer_vocab(512)
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 512
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>" and set(types[3:259]) == {6}
    assert tokens[259] == "▁" and set(types[259:]) == {1}
    assert len(set(tokenizer_vocab(262144)[0])) == 262144


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gemma3-swa"])
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "f16"])
def test_gguf_contents(models, shape, dtype):
    s = SHAPES[shape]
    r = gguf.GGUFReader(models(shape, dtype))
    tensors = {t.name: t for t in r.tensors}
    n_per_layer = 9 if s.arch == "llama" else 13
    assert len(tensors) == 2 + n_per_layer * s.n_layer + (s.arch == "llama")
    assert ("output.weight" in tensors) == (s.arch == "llama")  # gemma3 ties it to token_embd
    want = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
            "f16": gguf.GGMLQuantizationType.F16}[dtype]
    for t in tensors.values():
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.all(t.data == 1.0)
        else:
            assert t.tensor_type == want
    q = tensors["blk.0.attn_q.weight"]
    assert [int(x) for x in q.shape] == [s.n_embd, s.n_head * s.n_embd_head]  # ggml order
    w = gguf.quants.dequantize(q.data, q.tensor_type)
    assert w.shape == (s.n_head * s.n_embd_head, s.n_embd)
    assert abs(w.std() * np.sqrt(s.n_embd) - 1.0) < 0.05
    assert abs(w.mean()) < 0.05 * w.std()
    fields = r.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == s.arch
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"


def test_same_seed_same_bytes(tmp_path):
    a = write_model(tmp_path / "a.gguf", "tiny-llama", dtype="q8_0", seed=1).read_bytes()
    b = write_model(tmp_path / "b.gguf", "tiny-llama", dtype="q8_0", seed=1).read_bytes()
    c = write_model(tmp_path / "c.gguf", "tiny-llama", dtype="q8_0", seed=2).read_bytes()
    assert a == b and a != c and len(a) == len(c)


def test_cli(tmp_path, capsys):
    out = tmp_path / "sub" / "m.gguf"
    assert main([str(out), "--shape", "tiny-gemma3-swa", "--dtype", "q4_0", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and str(out.stat().st_size) in printed
    assert main(["--list"]) == 0
    assert "llama-7b" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# llama.cpp

@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gemma3-swa"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0"])
def test_loads_and_decodes(models, shape, dtype):
    s = SHAPES[shape]
    with load(models(shape, dtype)) as (model, ctx):
        assert L.llama_model_n_layer(model) == s.n_layer
        assert L.llama_model_n_head(model) == s.n_head
        assert L.llama_model_n_head_kv(model) == s.n_head_kv
        assert L.llama_model_n_embd(model) == s.n_embd
        assert L.llama_model_n_ctx_train(model) == s.n_ctx_train
        assert L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)) == s.n_vocab
        assert L.llama_model_n_swa(model) == (s.sliding_window or 0)
        assert meta(model, "general.architecture") == s.arch
        assert L.llama_model_n_params(model) == s.n_params

        tokens = long_tokens(model, 48)
        logits = decode(model, ctx, tokens)
        assert np.isfinite(logits).all()
        # logits of order 1 that depend on the token: a working, non-degenerate forward pass
        assert 0.3 < logits.std() < 10
        assert np.abs(np.diff(logits, axis=0)).mean() > 0.1


def test_rows_not_multiple_of_32_fall_back_to_f16(tmp_path):
    """q8_0/q4_0 need rows of 32k values; other matrices are written f16, and still load."""
    s = ModelShape(arch="llama", n_vocab=300, n_embd=48, n_layer=1, n_head=4, n_head_kv=2,
                   n_ff=96, n_ctx_train=512, name="odd")
    path = write_model(tmp_path / "odd.gguf", s, dtype="q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16  # rows of 48
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0  # rows of 96
    with load(path) as (model, ctx):
        assert L.llama_model_n_embd(model) == 48
        assert np.isfinite(decode(model, ctx, long_tokens(model, 40))).all()


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gemma3-swa"])
def test_tokenizer_roundtrip(models, shape):
    with load(models(shape, "q8_0"), vocab_only=True) as (model, _):
        vocab = L.llama_model_get_vocab(model)
        assert L.llama_vocab_bos(vocab) == 1 and L.llama_vocab_eos(vocab) == 2
        for text in [TEXT, b"hello world", b"a\tb\n\nc  d", bytes(range(32, 127))]:
            toks = tokenize(model, text)
            assert toks[0] == 1 and 0 not in toks  # BOS added, no <unk>
            assert len(toks) < len(text) + 2
            assert detokenize(model, toks[1:]).lstrip(b" ") == text.lstrip(b" ")
        # pieces merge: "▁a" is one token
        assert len(tokenize(model, b"a", add_bos=False)) == 1


@pytest.mark.parametrize("swa_full", [True, False])
def test_gemma3_sliding_window_layers(models, capture, swa_full):
    """SWA layers give exactly 0 to keys older than the window; the full layer does not."""
    s = SHAPES["tiny-gemma3-swa"]
    n, n_win, w = 100, 8, s.sliding_window
    with load(models("tiny-gemma3-swa", "f16"), n_batch=128, swa_full=swa_full) as (model, ctx):
        assert L.llama_model_n_swa(model) == w
        pos, scores = capture(model, ctx, long_tokens(model, n), n_win)
    assert np.array_equal(pos, np.arange(n))
    assert np.isfinite(scores).all()
    # each query's probabilities sum to 1 per head
    np.testing.assert_allclose(scores.sum(1), n_win * s.n_head, rtol=1e-3)
    first_q = n - n_win
    old = pos <= first_q - w  # masked for every window query in a SWA layer (p1 - p0 >= n_swa)
    seen = pos > n - 1 - w  # inside the window of every query
    zero_old = [il for il in range(s.n_layer) if np.all(scores[il, old] == 0.0)]
    assert zero_old == s.swa_layers  # exactly the SWA layers, and not all layers
    assert 0 < len(zero_old) < s.n_layer
    for il in range(s.n_layer):
        assert np.all(scores[il, seen] > 0)
        if not s.is_swa(il):
            assert np.all(scores[il, old] > 0)


def test_llama_attention_is_spread_but_not_uniform(models, capture):
    s = SHAPES["tiny-llama"]
    n, n_win = 64, 1
    with load(models("tiny-llama", "q8_0")) as (model, ctx):
        pos, scores = capture(model, ctx, long_tokens(model, n), n_win)
    np.testing.assert_allclose(scores.sum(1), n_win * s.n_head, rtol=1e-3)
    assert np.all(scores > 0)  # full causal attention: every key gets some
    p = scores / scores.sum(1, keepdims=True)
    # neither uniform nor collapsed on a few keys (random weights give logits of std ~1)
    assert np.all(p.max(1) / p.min(1) > 4)
    assert np.all(p.max(1) < 0.5)
    entropy = -(p * np.log(p)).sum(1) / np.log(n)
    assert np.all((entropy > 0.5) & (entropy < 0.99))
