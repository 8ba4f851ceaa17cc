"""What a user sees: perplexity of the policies on a long text, and a long chat, on the default model."""
import numpy as np
import pytest

from infmllm_gguf import StreamSession
from infmllm_gguf.data import shakespeare_path
from infmllm_gguf.perplexity import stream_perplexity
from infmllm_gguf.runtime import Runtime

N_TOKENS = 3072


@pytest.fixture(scope="module")
def shakespeare_tokens(default_model):
    text = shakespeare_path().read_text(encoding="utf-8")[:40_000]
    with Runtime(default_model, n_ctx=256) as rt:
        return rt.tokenize(text)[:N_TOKENS]


def test_perplexity_orders_the_policies(default_model, shakespeare_tokens):
    runs = {p: stream_perplexity(shakespeare_tokens, model_path=default_model, policy=p, budget=512, chunk=256)
            for p in ("inf-mllm", "streaming-llm", "window")}
    runs["full"] = stream_perplexity(shakespeare_tokens, model_path=default_model, policy="full",
                                     budget=N_TOKENS, chunk=256)
    print(f"\nperplexity, SmolLM2-135M, {N_TOKENS} tokens of Shakespeare, budget 512, chunk 256")
    for name, r in runs.items():
        print(f"  {name:14s} {r.ppl:8.3f}  {r.tokens_per_s:6.1f} tok/s  evict {r.evict_share:.2%}  "
              f"capture {r.capture_share:.2%}")
    ppl = {k: r.ppl for k, r in runs.items()}
    assert ppl["full"] < ppl["inf-mllm"] < ppl["streaming-llm"] < ppl["window"]


def test_three_hundred_chat_rounds_stay_in_budget(default_model):
    rng = np.random.default_rng(0)
    with StreamSession(default_model, budget=512, chunk=128) as s:
        for i in range(300):
            a, b = rng.integers(1, 100, 2)
            reply = s.chat(f"Round {i}: what is {a} plus {b}?", max_tokens=6, temperature=0.0)
            assert reply.strip(), f"empty reply in round {i}"
            assert s.runtime.n_cached() <= 512
        assert s.stats.evictions > 10
        print(f"\n300 rounds: {s.stats.tokens_seen} tokens streamed, {s.stats.evictions} evictions, "
              f"last reply {reply!r}")
