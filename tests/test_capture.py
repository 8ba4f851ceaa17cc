"""The patched llama.cpp's attention-score capture on the real default model."""
import numpy as np
import pytest

from conftest import PROMPT
from infmllm_gguf.runtime import CaptureError, Model, Runtime, native, system_info

W = 16


def capture(model, tokens, *, window=W, flash_attn=False, n_ubatch=None, layers=None):
    with Runtime(model, n_ctx=512, n_ubatch=n_ubatch, flash_attn=flash_attn) as rt:
        rt.capture_scores(window, layers)
        rt.decode(tokens, range(len(tokens)))
        return rt.read_scores(), rt.logits()


@pytest.fixture(scope="module")
def tokens(default_model):
    with Model(default_model) as m:
        return m.tokenize(PROMPT)


@pytest.fixture(scope="module")
def baseline(default_model, tokens):
    return capture(default_model, tokens)


def test_layer_scores_sum_to_window_times_heads(default_model, tokens, baseline):
    scores, _ = baseline
    with Model(default_model) as m:
        n_layer, n_head = m.n_layer, m.n_head
    assert scores.scores.shape == (n_layer, len(tokens))
    assert scores.n_queries == W
    np.testing.assert_array_equal(scores.positions, np.arange(len(tokens)))
    np.testing.assert_allclose(scores.scores.sum(axis=1), W * n_head, rtol=1e-3)
    # causal mask: a key after every window query gets nothing, and none is negative
    assert (scores.scores >= 0).all()


def test_capture_does_not_change_logits(default_model, tokens, baseline):
    _, logits_on = baseline
    with Runtime(default_model, n_ctx=512, flash_attn=False) as rt:
        rt.decode(tokens, range(len(tokens)))
        logits_off = rt.logits()
    np.testing.assert_array_equal(logits_on, logits_off)


def test_split_into_ubatches_gives_same_scores(default_model, tokens, baseline):
    # 7-token ubatches: the window straddles three of them
    split, _ = capture(default_model, tokens, n_ubatch=7)
    assert split.n_queries == W
    np.testing.assert_allclose(split.scores, baseline[0].scores, rtol=1e-4, atol=1e-4)


def test_flash_attention_on_and_off_agree(default_model, tokens, baseline):
    fa, fa_logits = capture(default_model, tokens, flash_attn=True)
    off = baseline[0].scores
    # layer 0 sees identical inputs with and without flash attention: same scores
    np.testing.assert_allclose(fa.scores[0], off[0], rtol=1e-3, atol=1e-5)
    # deeper layers inherit the small differences of the flash-attention forward itself
    # (its logits differ too), so they agree in shape, not to the last bit
    for layer in range(1, off.shape[0]):
        assert np.corrcoef(fa.scores[layer], off[layer])[0, 1] > 0.999, layer
    rel = np.linalg.norm(fa.scores - off) / np.linalg.norm(off)
    assert rel < 1e-2


def test_layer_subset(default_model, tokens, baseline):
    subset, _ = capture(default_model, tokens, layers=[3, 0, 17])
    assert subset.layers == (0, 3, 17)
    np.testing.assert_allclose(subset.scores, baseline[0].scores[[0, 3, 17]], rtol=1e-5, atol=1e-5)


def test_positions_after_seq_rm_are_the_survivors(default_model, tokens):
    with Runtime(default_model, n_ctx=512) as rt:
        rt.capture_scores(W)
        rt.decode(tokens, range(len(tokens)))
        before = rt.read_scores()
        rt.remove(5, 12)
        rt.remove(30, 31)
        after = rt.read_scores()
        assert rt.n_cached() == len(tokens) - 8
    survivors = [p for p in range(len(tokens)) if not (5 <= p < 12 or p == 30)]
    np.testing.assert_array_equal(after.positions, survivors)
    np.testing.assert_array_equal(after.scores, before.scores[:, survivors])


def test_scores_follow_shifted_positions(default_model, tokens):
    with Runtime(default_model, n_ctx=512) as rt:
        rt.capture_scores(W)
        rt.decode(tokens[:40], range(40))
        rt.remove(10, 20)
        rt.shift(20, 40, -10)  # close the gap: 30 cells at positions 0..29
        rt.decode(tokens[40:40 + W])
        got = rt.read_scores()
    np.testing.assert_array_equal(got.positions, np.arange(30 + W))
    np.testing.assert_allclose(got.scores.sum(axis=1), W * 9, rtol=1e-3)


def test_window_larger_than_batch_is_an_error(default_model):
    with Runtime(default_model, n_ctx=256) as rt:
        rt.capture_scores(8)
        with pytest.raises(ValueError, match="more than the batch"):
            rt.decode([1, 2, 3])


def test_read_before_any_decode_is_an_error(default_model):
    with Runtime(default_model, n_ctx=256) as rt:
        with pytest.raises(CaptureError, match="capture_scores"):
            rt.read_scores()
        rt.capture_scores(4)
        with pytest.raises(CaptureError):
            rt.read_scores()


def test_capture_off_after_on_reports_nothing(default_model, tokens):
    with Runtime(default_model, n_ctx=256) as rt:
        rt.capture_scores(4)
        rt.decode(tokens[:10], range(10))
        rt.read_scores()
        rt.capture_scores(0)
        rt.decode(tokens[10:12])
        with pytest.raises(CaptureError):
            rt.read_scores()


def test_invalid_layers_are_rejected(default_model):
    with Runtime(default_model, n_ctx=256) as rt:
        with pytest.raises(ValueError, match="layers"):
            rt.capture_scores(4, [0, 99])
        with pytest.raises(ValueError):
            rt.capture_scores(-1)


def test_missing_symbol_raises_unpatched_error():
    @native._capture_function("llama_attn_capture_not_in_any_build", [], None)
    def absent():
        ...
    with pytest.raises(native.UnpatchedLlamaError, match="make setup"):
        absent()
    assert native.is_patched()


def test_the_build_leaves_out_the_amx_kernels_that_crash():
    """AMX mul_mat segfaulted on the first batch on an AMX Xeon (ggml-org/llama.cpp#20824):
    scripts/build_llama.sh compiles it out even where -march=native would turn it on."""
    assert "AMX_INT8 = 1" not in system_info()
