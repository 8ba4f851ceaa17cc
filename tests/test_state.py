"""Saving and restoring a stream: the cache, the controller and the sampler continue where they were."""
from dataclasses import replace

import numpy as np
import pytest

from infmllm_gguf import StreamSession
from infmllm_gguf.session import log_softmax, nll_of
from infmllm_gguf.synthetic import write_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny-llama.gguf", "tiny-llama", dtype="f16")


def stream(n, seed=0):
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


@pytest.mark.parametrize("policy", ["inf-mllm", "h2o", "streaming-llm"])
def test_restore_continues_the_stream(tiny_llama, tmp_path, policy):
    ids = stream(700)
    with StreamSession(tiny_llama, budget=96, policy=policy, chunk=40, recent=16) as s:
        s.token_nll(ids[:400])  # 10 chunks: evicted, re-indexed, keys shifted since the last decode
        s.rng.random()          # the sampler moved on too
        s.save(tmp_path / "s.npz")
        kept, stats, last = s.cached_positions(), replace(s.stats), s.runtime.logits()
        after = s.token_nll(ids[400:])
        draw = s.rng.random()
    with StreamSession.restore(tmp_path / "s.npz", tiny_llama) as r:
        np.testing.assert_array_equal(r.cached_positions(), kept)
        assert r.stats == stats
        np.testing.assert_array_equal(r.runtime.logits(), last)  # the next token's logits, exactly
        assert r.rng.random() == draw
        again = r.token_nll(ids[400:])
    # the restored cells sit in other slots of the cache, so sums run in another order: noise only
    assert again.shape == after.shape
    np.testing.assert_allclose(again.mean(), after.mean(), rtol=1e-3)


def test_keys_shifted_before_saving_stay_shifted(tiny_llama, tmp_path):
    """llama.cpp applies a position shift to the keys lazily; a save right after an eviction must
    not lose it (a lost shift moves every logit, far beyond noise)."""
    ids = stream(300, seed=1)
    with StreamSession(tiny_llama, budget=96, policy="streaming-llm", chunk=40) as s:
        s.feed_tokens(ids[:280])
        s.save(tmp_path / "s.npz")
        s.feed_tokens(ids[280:])
        expected = s.runtime.logits()
    with StreamSession.restore(tmp_path / "s.npz", tiny_llama) as r:
        r.feed_tokens(ids[280:])
        got = r.runtime.logits()
    p, q = log_softmax(expected), log_softmax(got)
    assert float(np.sum(np.exp(p) * (p - q))) < 1e-4


def test_token_nll_continues_across_calls(tiny_llama):
    ids = stream(400, seed=2)
    with StreamSession(tiny_llama, budget=96, policy="inf-mllm", chunk=40, recent=16) as s:
        whole = s.token_nll(ids)
    with StreamSession(tiny_llama, budget=96, policy="inf-mllm", chunk=40, recent=16) as s:
        parts = np.concatenate([s.token_nll(ids[:120]), s.token_nll(ids[120:280]), s.token_nll(ids[280:])])
    assert whole.shape == (399,)
    np.testing.assert_array_equal(parts, whole)


def test_nll_of_matches_a_float64_log_softmax():
    logits = (np.random.default_rng(3).normal(size=(6, 5000)) * 8).astype(np.float32)
    targets = np.array([0, 17, 4999, 3, 3, 2500])
    np.testing.assert_allclose(nll_of(logits, targets), -log_softmax(logits)[np.arange(6), targets], rtol=1e-6)


def test_loading_into_another_setup_is_refused(tiny_llama, tmp_path):
    with StreamSession(tiny_llama, budget=96, policy="h2o", chunk=40, recent=16) as s:
        s.feed_tokens(stream(100))
        s.save(tmp_path / "s.npz")
    with StreamSession(tiny_llama, budget=128, policy="h2o", chunk=40, recent=16) as other:
        with pytest.raises(ValueError, match="budget=96"):
            other.load(tmp_path / "s.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a saved session")
    with pytest.raises(ValueError, match="not a session saved by infmllm-gguf"):
        StreamSession.restore(bad, tiny_llama)
    with pytest.raises(FileNotFoundError, match="no saved session"):
        StreamSession.restore(tmp_path / "missing.npz", tiny_llama)
