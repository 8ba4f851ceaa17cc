"""Saving and restoring a stream: the cache, the controller, the chat and the sampler continue where they
were; a file that does not fit is refused before anything changes."""
from dataclasses import replace

import numpy as np
import pytest

from infmllm_gguf import StreamSession
from infmllm_gguf.generation import log_softmax
from infmllm_gguf.generation import nll_of
from infmllm_gguf.state import read_state, write_state


def stream(n, seed=0):
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


@pytest.mark.parametrize("policy", ["inf-mllm", "h2o", "streaming-llm"])
def test_restore_continues_the_stream(tiny_llama, tmp_path, policy):
    ids = stream(700)
    with StreamSession(tiny_llama, policy, budget=96, chunk=40, recent=16) as s:
        s.token_nll(ids[:400])  # 10 chunks: evicted, re-indexed, keys shifted since the last decode
        s.rng.random()          # the sampler moved on too
        s.save(tmp_path / "s.npz")
        kept, stats, last = s.cached_stream_indices(), replace(s.stats), s.runtime.logits()
        after = s.token_nll(ids[400:])
        draw = s.rng.random()
    with StreamSession.restore(tmp_path / "s.npz", tiny_llama) as r:
        assert r.policy == s.policy
        np.testing.assert_array_equal(r.cached_stream_indices(), kept)
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
    with StreamSession(tiny_llama, "streaming-llm", budget=96, chunk=40) as s:
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
    with StreamSession(tiny_llama, budget=96, chunk=40, recent=16) as s:
        whole = s.token_nll(ids)
    with StreamSession(tiny_llama, budget=96, chunk=40, recent=16) as s:
        parts = np.concatenate([s.token_nll(ids[:120]), s.token_nll(ids[120:280]), s.token_nll(ids[280:])])
    assert whole.shape == (399,)
    np.testing.assert_array_equal(parts, whole)


def test_nll_of_matches_a_float64_log_softmax():
    logits = (np.random.default_rng(3).normal(size=(6, 5000)) * 8).astype(np.float32)
    targets = np.array([0, 17, 4999, 3, 3, 2500])
    np.testing.assert_allclose(nll_of(logits, targets), -log_softmax(logits)[np.arange(6), targets], rtol=1e-6)


def test_loading_into_another_setup_is_refused(tiny_llama, tmp_path):
    with StreamSession(tiny_llama, "h2o", budget=96, chunk=40, recent=16) as s:
        s.feed_tokens(stream(100))
        s.save(tmp_path / "s.npz")
    with StreamSession(tiny_llama, "h2o", budget=128, chunk=40, recent=16) as other:
        with pytest.raises(ValueError, match="'budget': 96"):
            other.load(tmp_path / "s.npz")
    with StreamSession(tiny_llama, "h2o", budget=96, chunk=40, recent=8) as other:  # a policy option alone
        with pytest.raises(ValueError, match="'recent': 16"):
            other.load(tmp_path / "s.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a saved session")
    with pytest.raises(ValueError, match="not a session saved by infmllm-gguf"):
        StreamSession.restore(bad, tiny_llama)
    with pytest.raises(FileNotFoundError, match="no saved session"):
        StreamSession.restore(tmp_path / "missing.npz", tiny_llama)


def test_a_file_older_than_an_option_loads_with_the_value_it_ran(tiny_llama, tmp_path):
    """Files saved before `granularity` existed ran one decision for all layers: they continue
    there, and in a session that decides per layer they are refused."""
    with StreamSession(tiny_llama, "inf-mllm", budget=96, chunk=40, recent=16, granularity="token") as s:
        s.feed_tokens(stream(200))
        s.save(tmp_path / "s.npz")
    header, components = read_state(tmp_path / "s.npz")
    del header["settings"]["policy"]["granularity"]
    write_state(tmp_path / "old.npz", header, components)
    with StreamSession.restore(tmp_path / "old.npz", tiny_llama) as r:
        assert r.policy.granularity == "token" and r.stats.tokens_seen == 200
    with StreamSession(tiny_llama, "inf-mllm", budget=96, chunk=40, recent=16) as layer:  # auto: per layer here
        with pytest.raises(ValueError, match="'granularity': 'token'.*'granularity': 'layer'"):
            layer.load(tmp_path / "old.npz")


def tampered(path, out, component, key, value):
    """A copy of the saved state at `path` with one array (or metadata entry) replaced."""
    header, components = read_state(path)
    meta, arrays = components[component]
    assert key in arrays or key in meta
    if key in arrays:
        arrays[key] = value
    else:
        meta[key] = value
    write_state(out, header, components)
    return out


@pytest.mark.parametrize("component, key, value, message", [
    ("cache", "is_image", np.zeros(3, dtype=bool), "image_flags|is_image has shape"),
    ("cache", "attention", np.zeros((3, 5)), "attention has shape"),
    ("cache", "visibility", np.zeros(7), "visibility has shape"),
    ("cache", "carried", np.zeros(2), "carried has shape"),
    ("cache", "stream_indices", np.array([5, 3, 9]), "not increasing"),
    ("runtime", "last_logits", np.zeros(7, dtype=np.float32), "saved logits have shape"),
    ("runtime", "n_cells", 95, r"llama.cpp's saved cells \(95\) and the stream's \(97\) do not match"),
    ("runtime", "cells", np.frombuffer(b"garbage" * 100, dtype=np.uint8), "could not load the saved cells"),
    ("chat", "last", [["robot", "hi"]], "chat transcript"),
    ("sampler", "rng", {"bit_generator": "nope"}, "sampler state"),
])
def test_a_failed_load_leaves_the_session_as_it_was(tiny_llama, tmp_path, component, key, value, message):
    """Every saved part is checked before any is applied (llama.cpp's bytes, which only llama.cpp can
    check, are rolled back): the session goes on exactly as if the load had not been tried."""
    with StreamSession(tiny_llama, "h2o", budget=96, chunk=40, recent=16, flash_attn=False) as s:
        s.transcript.load_state({"system": None, "last": [("user", "hello")], "fed": "<user>hello"})
        s.feed_tokens(stream(300, seed=4))
        s.cache.decode([7], generating=True)  # scores since the eviction, and a carried score: every array
        s.save(tmp_path / "s.npz")
    path = tampered(tmp_path / "s.npz", tmp_path / "bad.npz", component, key, value)
    # flash attention off: cells put back into other slots then give the same sums to the bit
    options = dict(budget=96, chunk=40, recent=16, flash_attn=False)
    with StreamSession(tiny_llama, "h2o", **options) as s, StreamSession(tiny_llama, "h2o", **options) as untouched:
        for session in (s, untouched):
            session.feed_tokens(stream(250, seed=5))
            session.cache.decode([9], generating=True)
        before = (s.cached_stream_indices(), replace(s.stats), s.runtime.logits(), s.cache.scores.attention.copy())
        with pytest.raises(ValueError, match=message):
            s.load(path)
        np.testing.assert_array_equal(s.cached_stream_indices(), before[0])
        assert s.stats == before[1] and s.runtime.n_cached() == before[0].size
        np.testing.assert_array_equal(s.runtime.logits(), before[2])
        np.testing.assert_array_equal(s.cache.scores.attention, before[3])
        assert s.transcript.state() == untouched.transcript.state()
        for session in (s, untouched):  # and it streams on as if nothing had happened
            session.feed_tokens(stream(60, seed=6))
        np.testing.assert_array_equal(s.runtime.logits(), untouched.runtime.logits())


def test_files_with_fields_added_or_removed_since_load_and_newer_ones_are_refused(tiny_llama, tmp_path):
    """A counter or an option this version does not know (a newer file's) is ignored, one it knows
    that the file lacks (an older file's) takes its default; a newer format version is refused."""
    with StreamSession(tiny_llama, "streaming-llm", budget=96, chunk=40, memory=True) as s:
        "".join(s.generate("Hello there.", max_tokens=3, temperature=0))
        s.save(tmp_path / "s.npz")
        stats = s.stats
    header, components = read_state(tmp_path / "s.npz")
    header["settings"]["speculative_draft"] = "tiny.gguf"           # a newer version's option
    header["extra"] = {"note": "kept"}
    components["cache"][0]["stats"]["tokens_drafted"] = 7            # a newer version's counter
    del components["cache"][0]["stats"]["image_cells_evicted"]       # a counter this file predates
    del components["memory"][0]["stats"]["spans_recalled"]
    components["memory"][0]["config"]["future_option"] = 1
    header["settings"]["memory"]["future_option"] = 1
    del header["settings"]["memory"]["image_cap_mib"]                # an option this file predates
    del components["memory"][0]["config"]["image_cap_mib"]
    components["chat"][0]["speaker_names"] = {}
    write_state(tmp_path / "mixed.npz", header, components)
    with pytest.warns(UserWarning, match="settings this version does not know \\(speculative_draft\\)"):
        with StreamSession.restore(tmp_path / "mixed.npz", tiny_llama) as r:
            assert r.stats.tokens_seen == stats.tokens_seen and r.stats.image_cells_evicted == 0
            assert r.memory.stats.spans_recalled == 0 and r.memory.stats.tokens_stored == stats.tokens_seen
            assert "".join(r.generate("And again.", max_tokens=3, temperature=0))  # it goes on

    header["version"] = 99
    write_state(tmp_path / "newer.npz", header, components)
    with pytest.raises(ValueError, match="saved by a newer infmllm-gguf \\(state format 99"):
        StreamSession.restore(tmp_path / "newer.npz", tiny_llama)


def test_a_stats_read_is_a_copy(tiny_llama):
    with StreamSession(tiny_llama, "streaming-llm", budget=96, chunk=40, memory=True) as s:
        s.feed_text("One two three.")
        cache, memory = s.stats, s.memory.stats
        s.feed_text("Four five six.")
        assert s.stats.tokens_seen > cache.tokens_seen and s.memory.stats.tokens_stored > memory.tokens_stored
