"""What a user sees: perplexity of the policies on a long text, on the default model (the long
chat is in test_transcript.py)."""
import pytest

from infmllm_gguf.data import shakespeare_path
from infmllm_gguf.perplexity import stream_perplexity
from infmllm_gguf.session import SessionConfig
from infmllm_gguf.runtime import Model

N_TOKENS = 3072


@pytest.fixture(scope="module")
def shakespeare_tokens(default_model):
    text = shakespeare_path().read_text(encoding="utf-8")[:40_000]
    with Model(default_model) as m:
        return m.tokenize(text)[:N_TOKENS]


def test_perplexity_orders_the_policies(default_model, shakespeare_tokens):
    runs = {p: stream_perplexity(shakespeare_tokens, model=default_model,
                                 config=SessionConfig.of(p, budget=512, chunk=256, memory=False))
            for p in ("inf-mllm", "streaming-llm", "recent-only")}
    runs["full"] = stream_perplexity(shakespeare_tokens, model=default_model,
                                     config=SessionConfig.of("full", budget=N_TOKENS, chunk=256))
    print(f"\nperplexity, SmolLM2-135M, {N_TOKENS} tokens of Shakespeare, budget 512, chunk 256")
    for name, r in runs.items():
        print(f"  {name:14s} {r.ppl:8.3f}  {r.tokens_per_s:6.1f} tok/s  evict {r.evict_share:.2%}  "
              f"capture {r.capture_share:.2%}")
    ppl = {k: r.ppl for k, r in runs.items()}
    assert ppl["full"] < ppl["inf-mllm"] < ppl["streaming-llm"] < ppl["recent-only"]
