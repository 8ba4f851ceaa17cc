"""llama.cpp's sampler chain (`runtime.ChainSampler`): greedy, top-k, seeds, logit bias, the
penalties as llama.cpp documents them, Mirostat's truncation, GBNF grammars (checked after the draw,
or masking first as llama-cpp-python does) and JSON schemas, bad input refused with ValueError; and
in a session: `generate` and `chat` with the chain, a JSON answer that stays valid while the cache
evicts during it."""
import json

import numpy as np
import pytest

from infmllm_gguf import StreamSession
from infmllm_gguf.runtime import ChainSampler, Model, SamplerOptions
from infmllm_gguf.runtime.sampler import grammar_text

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}, "alive": {"type": "boolean"}},
          "required": ["name", "age", "alive"], "additionalProperties": False}


def check_schema(text: str) -> dict:
    """SCHEMA's shape, checked by hand."""
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) == {"name", "age", "alive"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 20
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert isinstance(value["alive"], bool)
    return value


@pytest.fixture(scope="module")
def model(default_model):
    with Model(default_model) as m:
        yield m


@pytest.fixture(scope="module")
def session(default_model):
    # one thread: llama.cpp's threads spin at their barriers, which two cores shared with others make slow
    with StreamSession(default_model, budget=128, chunk=32, n_threads=1) as s:
        yield s


def logits_rows(model, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, model.n_vocab)) * 3).astype(np.float32)


def peaked(model, values: dict[int, float]) -> np.ndarray:
    logits = np.full(model.n_vocab, -20.0, dtype=np.float32)
    for token, value in values.items():
        logits[token] = value
    return logits


def test_temperature_zero_is_argmax(model):
    with ChainSampler(model, SamplerOptions(temperature=0)) as greedy:
        for row in logits_rows(model):
            assert greedy(row) == int(np.argmax(row))


def test_top_k_1_is_greedy(model):
    with ChainSampler(model, SamplerOptions(temperature=1.0, top_k=1, top_p=1.0), seed=7) as top1:
        for row in logits_rows(model, seed=1):
            assert top1(row) == int(np.argmax(row))


def test_a_seed_gives_the_same_draws(model):
    rows = logits_rows(model, n=20, seed=2) / 3  # flat enough that the draws differ
    options = SamplerOptions(temperature=1.0, top_p=1.0, seed=1234)
    with ChainSampler(model, options) as a, ChainSampler(model, options) as b:
        first = [a(r) for r in rows]
        assert first == [b(r) for r in rows]
        a.reset()  # back to its seed
        assert [a(r) for r in rows] == first
        assert len(set(first)) > 1 and first != [int(np.argmax(r)) for r in rows]
    with ChainSampler(model, SamplerOptions(temperature=1.0, top_p=1.0, seed=99)) as other:
        assert [other(r) for r in rows] != first


def test_a_negative_logit_bias_moves_the_greedy_choice(model):
    row = logits_rows(model, n=1, seed=3)[0]
    best, second = np.argsort(-row)[:2]
    for bias in (-np.inf, -1e4):
        with ChainSampler(model, SamplerOptions(temperature=0, logit_bias={int(best): bias})) as s:
            assert s(row) == second
    with ChainSampler(model, SamplerOptions(temperature=0, logit_bias={int(second): 100.0})) as s:
        assert s(row) == second


def test_the_penalties_lower_a_repeated_token_as_llama_cpp_documents(model):
    """llama.cpp: a token seen n times in the window has its logit divided by the repeat penalty
    (multiplied if <= 0), then lowered by n * frequency + presence. Two tokens 0.1 apart: the
    penalty either swaps them or not, at thresholds computed from that rule."""
    a, b, other = 100, 200, 300
    positive, negative = peaked(model, {a: 2.0, b: 1.9}), peaked(model, {a: -1.0, b: -1.05})

    def after(options: dict, logits, seen=(a,)) -> int:
        with ChainSampler(model, SamplerOptions(temperature=0, **options)) as s:
            for token in seen:  # what the reply holds so far, accepted as the generation accepts it
                s(peaked(model, {token: 5.0}))
            return s(logits)
    assert after({}, positive) == a
    assert after({"repeat_penalty": 1.1}, positive) == b       # 2.0 / 1.1 = 1.82 < 1.9
    assert after({"repeat_penalty": 1.04}, positive) == a      # 2.0 / 1.04 = 1.92 > 1.9
    assert after({"repeat_penalty": 1.1}, negative) == b       # -1.0 * 1.1 = -1.1 < -1.05
    assert after({"frequency_penalty": 0.06}, positive, seen=(a,)) == a     # 2.0 - 0.06 > 1.9
    assert after({"frequency_penalty": 0.06}, positive, seen=(a, a)) == b   # 2.0 - 0.12 < 1.9
    assert after({"presence_penalty": 0.2}, positive, seen=(a, a)) == b     # 2.0 - 0.2, however many times
    assert after({"presence_penalty": 0.05}, positive, seen=(a, a, a)) == a
    # the window: only the last penalty_last_n tokens count
    assert after({"repeat_penalty": 1.1, "penalty_last_n": 1}, positive, seen=(a, other)) == a
    assert after({"repeat_penalty": 1.1, "penalty_last_n": 2}, positive, seen=(a, other)) == b
    assert after({"repeat_penalty": 1.1, "penalty_last_n": 0}, positive) == a  # 0: off


def test_a_grammar_constrains_the_reply(session):
    for seed in range(4):
        session.reset()
        pieces = list(session.generate("Is the sky blue? Answer:", grammar='root ::= " yes" | " no"', seed=seed,
                                       temperature=1.0, max_tokens=20))
        assert "".join(pieces) in (" yes", " no")
        assert pieces[-1].finish_reason == "stop"  # the grammar complete: only an end-of-generation token left


def test_a_json_schema_answer_validates(session):
    session.reset()
    reply = session.chat("Describe a person as JSON with a name, an age and whether they are alive.",
                         json_schema=SCHEMA, temperature=0, max_tokens=200)
    check_schema(reply)
    assert session.last_reply.finish_reason == "stop"


def test_a_json_answer_stays_valid_while_the_cache_evicts_during_it(session):
    """Budget 128, chunk 32: the answer itself is evicted from as it grows; the grammar follows the
    tokens sampled, not the cache, so the JSON still parses and has the schema's shape."""
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                         "minItems": 16, "maxItems": 18},
                                               "done": {"type": "boolean"}},
              "required": ["items", "done"], "additionalProperties": False}
    session.reset()
    session.feed_text("A list of fruits and vegetables that grow in a garden: apples, pears, carrots. " * 12)
    pieces = session.generate("List them as JSON:", json_schema=schema, temperature=0.5, seed=3, max_tokens=300,
                              repeat_penalty=1.1)  # the prompt is fed here, the cache at its budget
    evictions = session.stats.evictions
    pieces = list(pieces)
    reply = "".join(pieces)
    assert pieces[-1].finish_reason == "stop", reply
    value = json.loads(reply)
    assert set(value) == {"items", "done"} and isinstance(value["done"], bool)
    assert 16 <= len(value["items"]) <= 18 and all(isinstance(i, str) and len(i) <= 12 for i in value["items"])
    assert session.last_reply.n_tokens >= 64  # two generation headrooms of 32
    assert session.stats.evictions >= evictions + 2, "the cache did not evict during the answer"


def test_the_chain_at_temperature_zero_generates_what_an_argmax_callable_does(session):
    session.reset()
    chain = "".join(session.generate("The capital of France is", temperature=0, max_tokens=24))
    session.reset()
    python = "".join(session.generate("The capital of France is", sampler=lambda logits: int(np.argmax(logits)),
                                      max_tokens=24))
    assert chain == python and chain


def test_a_seeded_generation_repeats(session):
    replies = []
    for _ in range(2):
        session.reset()
        replies.append("".join(session.generate("Once upon a time", seed=42, temperature=1.0, max_tokens=24)))
    assert replies[0] == replies[1] and replies[0]


@pytest.mark.parametrize("grammar", ['root ::= foo', 'rot ::= "a"', 'root ::= "a" (', "   "])
def test_a_bad_grammar_is_a_value_error(model, session, grammar):
    with pytest.raises(ValueError, match="grammar"):
        ChainSampler(model, SamplerOptions(grammar=grammar))
    session.reset()
    with pytest.raises(ValueError, match="grammar"):
        session.generate("hello", grammar=grammar)
    assert session.stats.tokens_seen == 0  # refused before the prompt was fed


@pytest.mark.parametrize("schema", [{"type": "foo"}, "{not json", {"$ref": "#/nowhere"}, 42])
def test_a_bad_schema_is_a_value_error(model, schema):
    with pytest.raises(ValueError, match="JSON schema"):
        ChainSampler(model, SamplerOptions(json_schema=schema))


@pytest.mark.parametrize("options", [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_k": -1},
                                     {"top_p": 1.5}, {"min_p": -0.1}, {"typical_p": 2.0}, {"repeat_penalty": 0.0},
                                     {"frequency_penalty": float("inf")}, {"penalty_last_n": -1}, {"seed": -1},
                                     {"seed": 2**32 - 1}, {"logit_bias": {-1: 1.0}}, {"logit_bias": {5: float("nan")}},
                                     {"grammar": 'root ::= "a"', "json_schema": {"type": "string"}}])
def test_out_of_range_options_are_value_errors(options):
    with pytest.raises(ValueError):
        SamplerOptions(**options)


def test_a_bias_beyond_the_vocabulary_is_a_value_error(model):
    with pytest.raises(ValueError, match="vocabulary"):
        ChainSampler(model, SamplerOptions(logit_bias={model.n_vocab: 1.0}))


def test_a_grammar_that_allows_no_token_left_is_a_value_error_not_a_crash(model):
    yes = model.tokenize("yes", add_special=False)
    assert len(yes) == 1
    biased = {t: -np.inf for t in range(model.n_vocab)}  # every token forbidden
    with ChainSampler(model, SamplerOptions(grammar='root ::= "yes"', logit_bias=biased, temperature=0)) as s:
        with pytest.raises(ValueError, match="allows no token"):
            s(logits_rows(model, n=1)[0])


def test_a_sampler_and_options_together_are_refused(session):
    with pytest.raises(ValueError, match="sampler"):
        session.generate("hi", sampler=lambda logits: int(np.argmax(logits)), temperature=0.5)
    with pytest.raises(ValueError, match="sampler"):
        session.chat_stream("hi", sampler=lambda logits: int(np.argmax(logits)), top_k=3)


def test_mirostat_2_keeps_the_tokens_below_its_surprise_target(model):
    """Mirostat 2.0's first step keeps the tokens whose surprise, -log2 p, is at most 2 * tau: with
    p = 1/2, 1/4 and the rest spread thin (surprise ~17 bits), tau 1.25 keeps the first two, tau 0.25
    only the likeliest (it keeps one when none is below); without Mirostat, the thin rest is drawn."""
    a, b = 100, 200
    logits = np.full(model.n_vocab, np.log(0.25 / (model.n_vocab - 2)), dtype=np.float32)
    logits[a], logits[b] = np.log(0.5), np.log(0.25)

    def first_draws(**options) -> set[int]:
        draws = set()
        for seed in range(40):
            with ChainSampler(model, SamplerOptions(temperature=1.0, top_p=1.0, seed=seed, **options)) as s:
                draws.add(s(logits))
        return draws
    assert first_draws(mirostat=2, mirostat_tau=1.25) == {a, b}
    assert first_draws(mirostat=2, mirostat_tau=0.25) == {a}
    assert len(first_draws() - {a, b}) > 1


def test_mirostat_1_with_a_tiny_target_draws_the_likeliest(model):
    rows = logits_rows(model, n=10, seed=4)
    for mode in (1, 2):
        with ChainSampler(model, SamplerOptions(temperature=1.0, mirostat=mode, mirostat_tau=0.01, seed=5)) as s:
            assert [s(r) for r in rows] == [int(np.argmax(r)) for r in rows]
    with ChainSampler(model, SamplerOptions(temperature=1.0, mirostat=1, mirostat_tau=3.0, seed=5)) as s:
        assert [s(r) for r in rows] != [int(np.argmax(r)) for r in rows]


def test_grammar_first_draws_from_the_tokens_the_grammar_allows(model):
    """With `grammar_first`, a draw is the chain's draw from logits whose tokens outside the grammar
    are -inf: the same as a chain without a grammar over logits masked by hand (the tokens whose
    text starts "yes" or "no"), seed for seed. The default (the grammar checks the chain's token,
    then masks and draws again) is another distribution."""
    grammar = 'root ::= "yes" | "no"'
    allowed = [t for t in range(model.n_vocab)
               if (text := model.token_bytes(t)) and (b"yes".startswith(text) or b"no".startswith(text))
               and not model.is_end_of_generation(t)]
    logits = logits_rows(model, n=1, seed=6)[0]
    logits[allowed] += 6.0  # likely, but less than the rest together
    masked = np.full_like(logits, -np.inf)
    masked[allowed] = logits[allowed]

    def draws(row, **options) -> list[int]:
        out = []
        for seed in range(30):
            with ChainSampler(model, SamplerOptions(temperature=1.0, top_k=40, top_p=0.9, seed=seed, **options)) as s:
                out.append(s(row))
        return out
    expected = draws(masked)
    assert set(expected) <= set(allowed) and len(set(expected)) > 1
    assert draws(logits, grammar=grammar, grammar_first=True) == expected
    assert set(draws(logits, grammar=grammar)) <= set(allowed)
    assert draws(logits, grammar=grammar) != expected


def test_a_grammar_is_gbnf_text_or_a_llama_grammar():
    from llama_cpp import LlamaGrammar

    gbnf = 'root ::= "a" | "b"'
    assert grammar_text(gbnf) == gbnf
    assert grammar_text(LlamaGrammar.from_string(gbnf)) == gbnf
    assert "root ::=" in grammar_text(LlamaGrammar.from_json_schema('{"type": "integer"}'))
    with pytest.raises(ValueError, match="GBNF text or a llama_cpp.LlamaGrammar"):
        grammar_text(42)


@pytest.mark.parametrize("options", [{"mirostat": 3}, {"mirostat_tau": -1.0}, {"mirostat_eta": float("nan")}])
def test_out_of_range_mirostat_options_are_value_errors(options):
    with pytest.raises(ValueError, match="mirostat"):
        SamplerOptions(**options)
