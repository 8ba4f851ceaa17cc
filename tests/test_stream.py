"""The eviction engine on real llama.cpp caches: bounds, stream order, re-indexing, long streams."""
import resource

import numpy as np
import pytest

from infmllm_gguf import StreamSession
from infmllm_gguf.runtime import Runtime
from infmllm_gguf.synthetic import write_model

BOUNDED = ["inf-mllm", "h2o", "streaming-llm", "window", "context-shift"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny-llama.gguf", "tiny-llama", dtype="f16")


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny-gemma3.gguf", "tiny-gemma3-swa", dtype="f16")


def check_cache(s: StreamSession):
    """What llama.cpp itself holds agrees with the controller, within the budget."""
    rt, ids, policy = s.runtime, s.cached_positions(), s.policy
    n = rt.n_cached()
    assert n == ids.size <= policy.budget
    # re-indexed to contiguous positions (an iSWA model's pos_min is its window cache's)
    assert rt.pos_max() == n - 1 and (rt.pos_min() == 0 or rt.n_swa > 0)
    assert np.all(np.diff(ids) > 0)                      # survivors in stream order
    seen = s.stats.tokens_seen
    recent = min(policy.recent, n)
    np.testing.assert_array_equal(ids[n - recent:], np.arange(seen - recent, seen))
    sinks = min(policy.sinks, seen)
    np.testing.assert_array_equal(ids[:sinks], np.arange(sinks))


@pytest.mark.parametrize("policy", BOUNDED)
def test_every_policy_keeps_the_cache_bounded(tiny_llama, policy):
    rng = np.random.default_rng(0)
    options = {"recent": 16} if policy in ("inf-mllm", "h2o") else {}
    with StreamSession(tiny_llama, budget=96, policy=policy, chunk=40, **options) as s:
        for _ in range(30):
            s.feed_tokens(rng.integers(3, 500, int(rng.integers(1, 40))).tolist())
            check_cache(s)
        assert s.stats.evictions > 5
        assert s.stats.cells_evicted == s.stats.tokens_seen - s.runtime.n_cached()


def test_full_policy_says_when_the_stream_outgrows_it(tiny_llama):
    with StreamSession(tiny_llama, budget=64, policy="full", chunk=32) as s:
        s.feed_tokens(list(range(10, 74)))
        with pytest.raises(RuntimeError, match="outgrew"):
            s.feed_tokens(list(range(10, 20)))


def test_sliding_window_model_streams(tiny_gemma3):
    rng = np.random.default_rng(1)
    with StreamSession(tiny_gemma3, budget=80, policy="inf-mllm", chunk=32, recent=16, window=16) as s:
        for _ in range(25):
            s.feed_tokens(rng.integers(3, 500, 32).tolist())
            check_cache(s)
        scores = s.runtime.read_scores()
        assert scores.scores.shape == (8, 80) and scores.scores.sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=64, recent=64), "must exceed recent"),
    (dict(budget=64, window=128, chunk=64), "must not exceed chunk"),
    (dict(policy="lru"), "unknown policy"),
    (dict(bias=-1.0), "bias"),
    (dict(policy="window", bias=1.0), "does not take option 'bias'"),
])
def test_invalid_configurations_name_the_fix(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreamSession(tiny_llama, **kwargs)


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
    with Runtime(default_model, n_ctx=512) as rt:
        text = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. "
                "Ships passed in the night and sailors were grateful for the steady beam. ") * 3
        toks = rt.tokenize(text)[:200]
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


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_long_stream_stays_bounded_in_cells_and_memory(tiny_llama):
    rng = np.random.default_rng(2)
    with StreamSession(tiny_llama, budget=256, policy="inf-mllm", chunk=256, recent=32) as s:
        rss = {}
        while s.stats.tokens_seen < 50_000:
            s.feed_tokens(rng.integers(3, 500, 256).tolist())
            assert s.runtime.n_cached() <= 256
            if s.stats.tokens_seen in (10_240, 49_920):
                rss[s.stats.tokens_seen] = rss_mb()
        print(f"\nRSS at 10k tokens {rss[10_240]:.1f} MB, at 50k {rss[49_920]:.1f} MB")
        assert rss[49_920] < rss[10_240] * 1.03 + 2
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
