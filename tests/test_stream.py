"""The eviction engine on real llama.cpp caches: bounds, stream order, re-indexing, visibility, long streams."""
import numpy as np
import pytest

from conftest import PROMPT
from infmllm_gguf import StreamSession
from infmllm_gguf.scores import queries_seen
from infmllm_gguf.policies import InfMLLM
from infmllm_gguf.runtime import Model, Runtime

BOUNDED = ["inf-mllm", "h2o", "streaming-llm", "recent-only", "context-shift"]


def check_cache(s: StreamSession):
    """What llama.cpp itself holds agrees with the controller, within the budget; with per-layer
    eviction, in every layer."""
    rt, policy = s.runtime, s.policy
    rows = s.cache.cells.held_by_layer
    n = rt.n_cached()
    assert n == rows.shape[1] <= policy.budget
    # re-indexed to contiguous positions (an iSWA model's pos_min is its window cache's)
    assert rt.pos_max() == n - 1 and (rt.pos_min() == 0 or s.model.sliding_window > 0)
    seen = s.stats.tokens_seen
    recent, sinks = min(policy.recent, n), min(policy.sinks, seen)
    for ids in rows:
        assert np.all(np.diff(ids) > 0)                  # survivors in stream order
        np.testing.assert_array_equal(ids[n - recent:], np.arange(seen - recent, seen))
        np.testing.assert_array_equal(ids[:sinks], np.arange(sinks))


@pytest.mark.parametrize("policy", BOUNDED)
def test_every_policy_keeps_the_cache_bounded(tiny_llama, policy):
    rng = np.random.default_rng(0)
    options = {"recent": 16} if policy in ("inf-mllm", "h2o") else {}
    with StreamSession(tiny_llama, policy, budget=96, chunk=40, **options) as s:
        for _ in range(30):
            s.feed_tokens(rng.integers(3, 500, int(rng.integers(1, 40))).tolist())
            check_cache(s)
        assert s.stats.evictions > 5
        assert s.stats.cells_evicted == s.stats.tokens_seen - s.runtime.n_cached()


def test_full_policy_says_when_the_stream_outgrows_it(tiny_llama):
    with StreamSession(tiny_llama, "full", budget=64, chunk=32) as s:
        s.feed_tokens(list(range(10, 74)))
        with pytest.raises(RuntimeError, match="outgrew"):
            s.feed_tokens(list(range(10, 20)))


def test_sliding_window_model_streams(tiny_gemma3):
    rng = np.random.default_rng(1)
    with StreamSession(tiny_gemma3, "inf-mllm", budget=80, chunk=32, recent=16, window=16) as s:
        for _ in range(25):
            s.feed_tokens(rng.integers(3, 500, 32).tolist())
            check_cache(s)
        scores = s.runtime.read_scores()
        assert scores.scores.shape == (8, 80) and scores.scores.sum() > 0


@pytest.mark.parametrize("policy, kwargs, message", [
    ("inf-mllm", dict(budget=64, recent=64), "must exceed recent"),
    ("inf-mllm", dict(budget=128, window=128, chunk=64), "must not exceed chunk"),
    ("lru", {}, "unknown policy"),
    ("inf-mllm", dict(bias=-1.0), "bias"),
    ("recent-only", dict(bias=1.0), "does not take option 'bias'"),
    (InfMLLM(), dict(bias=1.0), "go with a policy name"),
])
def test_invalid_configurations_name_the_fix(tiny_llama, policy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreamSession(tiny_llama, policy, **kwargs)


def test_a_policy_object_and_its_name_with_options_are_the_same_session(tiny_llama):
    tokens = np.random.default_rng(5).integers(3, 500, 300).tolist()
    with StreamSession(tiny_llama, InfMLLM(budget=96, recent=8, bias=2.0), chunk=40) as a, \
            StreamSession(tiny_llama, "inf-mllm", budget=96, recent=8, bias=2.0, chunk=40) as b:
        a.feed_tokens(tokens)
        b.feed_tokens(tokens)
        np.testing.assert_array_equal(a.cached_stream_indices(), b.cached_stream_indices())
        np.testing.assert_array_equal(a.runtime.logits(), b.runtime.logits())


def test_sessions_can_share_one_model(tiny_llama):
    tokens = np.random.default_rng(6).integers(3, 500, 200).tolist()
    with Model(tiny_llama) as model:
        with StreamSession(model, "streaming-llm", budget=64, chunk=32) as a, \
                StreamSession(model, "streaming-llm", budget=64, chunk=32) as b:
            for i in range(0, 200, 32):  # interleaved: each context keeps its own cells
                a.feed_tokens(tokens[i:i + 32])
                b.feed_tokens(tokens[i:i + 32])
            np.testing.assert_array_equal(a.runtime.logits(), b.runtime.logits())
            logits = a.runtime.logits()
        assert model.ptr  # closing the sessions leaves a shared model loaded
        with StreamSession(model, "streaming-llm", budget=64, chunk=32) as c:
            c.feed_tokens(tokens)
            np.testing.assert_array_equal(c.runtime.logits(), logits)


def test_queries_seen_by_hand():
    # 3 old cells, a chunk of 5 whose last 3 queries are captured (offsets 2, 3, 4 of the chunk):
    # the old cells are seen by all 3; chunk cell i by the captured queries at offsets >= i
    np.testing.assert_array_equal(queries_seen(3, 5, 3, causal=True), [3, 3, 3, 3, 3, 3, 2, 1])
    # a chunk shorter than the window: 2 queries captured of 2
    np.testing.assert_array_equal(queries_seen(4, 2, 2, causal=True), [2, 2, 2, 2, 2, 1])
    # an image read both ways: every captured query sees every cell
    np.testing.assert_array_equal(queries_seen(2, 4, 3, causal=False), [3, 3, 3, 3, 3, 3])


def test_the_controller_hands_the_policy_what_its_queries_saw(tiny_llama):
    """A short trailing chunk: 8 tokens after a chunk of 40, window 16. The policy divides by 8
    (the captured queries), and each layer's attention sums to 8 queries x 4 heads."""
    with StreamSession(tiny_llama, "inf-mllm", budget=96, recent=8, window=16, chunk=40) as s:
        s.feed_tokens(list(range(3, 43)))
        s.feed_tokens(list(range(50, 58)))
        np.testing.assert_array_equal(s.cache.scores.visibility, queries_seen(40, 8, 8, causal=True))
        np.testing.assert_allclose(s.cache.scores.attention.sum(axis=1), 8 * s.model.n_head, rtol=1e-3)
    with StreamSession(tiny_llama, "h2o", budget=96, recent=8, chunk=40) as s:  # H2O adds the chunks up
        s.feed_tokens(list(range(3, 43)))
        s.feed_tokens(list(range(50, 58)))
        np.testing.assert_array_equal(s.cache.scores.visibility, queries_seen(40, 8, 8, True) +
                                      np.concatenate([queries_seen(0, 40, 40, True), np.zeros(8)]))
        np.testing.assert_allclose(s.cache.scores.attention.sum(axis=1), 48 * s.model.n_head, rtol=1e-3)


def kl(p_logits, q_logits):
    p = np.exp(p_logits - p_logits.max()); p /= p.sum()
    q = np.exp(q_logits - q_logits.max()); q /= q.sum()
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


def test_shifting_every_position_keeps_the_logits(default_model):
    toks = list(range(1000, 1100))
    with Runtime(default_model, n_ctx=512) as a, Runtime(default_model, n_ctx=512) as b:
        a.decode(toks, range(100))
        a.decode([42], [100])
        b.decode(toks, range(100))
        b.shift(0, 100, 37)
        b.decode([42], [137])
        div = kl(a.logits(), b.logits())
        same_top = a.logits().argmax() == b.logits().argmax()
    # K-shift re-rotates the cached keys, stored in f16: rounding, nothing more
    print(f"\nKL after shifting all positions by 37: {div:.2e}")
    assert div < 5e-3 and same_top


def test_evict_and_reindex_is_close_to_recomputing(default_model):
    with Model(default_model) as m:
        text = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. "
                "Ships passed in the night and sailors were grateful for the steady beam. ") * 3
        toks = m.tokenize(text)[:200]
    kept = toks[:50] + toks[120:]
    with Runtime(default_model, n_ctx=512) as a, Runtime(default_model, n_ctx=512) as b:
        a.decode(toks, range(len(toks)))
        a.remove(50, 120)
        a.shift(120, len(toks), -70)
        a.decode([toks[0]], [len(kept)])
        b.decode(kept, range(len(kept)))
        b.decode([toks[0]], [len(kept)])
        div = kl(b.logits(), a.logits())
    print(f"\nKL(recomputed || evicted+re-indexed): {div:.3e}")
    assert 0 < div < 0.5


def test_long_stream_stays_bounded_in_cells_and_memory(tiny_llama, rss):
    rng = np.random.default_rng(2)
    # the memory (off here) grows by design, up to its caps
    with StreamSession(tiny_llama, "inf-mllm", budget=256, chunk=256, recent=32, memory=False) as s:
        seen = {}
        while s.stats.tokens_seen < 50_000:
            s.feed_tokens(rng.integers(3, 500, 256).tolist())
            assert s.runtime.n_cached() <= 256
            if s.stats.tokens_seen in (10_240, 49_920):
                seen[s.stats.tokens_seen] = rss()
        print(f"\nRSS at 10k tokens {seen[10_240]:.1f} MiB, at 50k {seen[49_920]:.1f} MiB")
        assert seen[49_920] < seen[10_240] * 1.03 + 2
        assert s.stats.tokens_seen == 50_176 and s.runtime.n_cached() == 256


def test_generation_evicts_and_returns_to_budget(default_model):
    with StreamSession(default_model, budget=64, chunk=32, recent=16, window=16, generation_headroom=16) as s:
        s.feed_text("Once upon a time, in a small village by the sea, there lived an old fisherman who")
        pieces = list(s.generate(max_tokens=80, temperature=0.0))
        assert "".join(pieces)
        assert s.runtime.n_cached() <= 64
        check_cache(s)
        assert s.stats.cells_cached == s.runtime.n_cached()
        assert 64 < s.stats.peak_cells <= 64 + 16
        assert s.stats.tokens_seen > 64 and s.stats.evictions > 0


def generate_counting_captures(s: StreamSession, n: int) -> list[int]:
    """Generate `n` tokens (a sampler that never ends the reply); the cells cached at each captured step."""
    captured_at, observe, script = [], s.cache._observe, iter(range(1000, 1000 + n))

    def spy(*args, **kwargs):
        captured_at.append(s.runtime.n_cached())
        return observe(*args, **kwargs)
    s.cache._observe = spy
    list(s.generate(max_tokens=n, sampler=lambda logits: next(script)))
    return captured_at


def test_generation_captures_only_the_steps_the_policy_reads(default_model):
    """Eviction every 32 steps, a window of 8: the last 8 steps before each eviction are captured and
    no other; a generation that stops between two evictions keeps its uncaptured tail."""
    with StreamSession(default_model, budget=128, chunk=64, recent=16, window=8, generation_headroom=32) as s:
        s.feed_tokens(s.tokenize(PROMPT * 4)[:130])
        assert s.runtime.n_cached() == 128 and s.stats.evictions == 1
        # 80 steps: cells 129..160 twice (an eviction at 160 each time), then 129..144
        assert generate_counting_captures(s, 80) == list(range(153, 161)) * 2
        assert s.stats.evictions == 1 + 2 + 1  # the prompt's, two planned, the end's
        check_cache(s)
        # the end's eviction kept the 16 steps that no captured query saw, as recent cells
        np.testing.assert_array_equal(s.cached_stream_indices()[-16:], np.arange(130 + 64, 130 + 80))
        assert s.cache.scores.unseen == 0 and s.runtime.n_cached() == 128


def test_every_step_is_captured_for_a_policy_that_reads_every_query(default_model):
    with StreamSession(default_model, "h2o", budget=128, chunk=64, recent=16, generation_headroom=32) as s:
        s.feed_tokens(s.tokenize(PROMPT * 4)[:130])
        assert generate_counting_captures(s, 40) == list(range(129, 161)) + list(range(129, 137))
        check_cache(s)
