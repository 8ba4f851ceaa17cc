"""Generation in layers: token ids to text through the streaming detokenizer (checked against
llama-cpp-python's own detokenizer), stop strings, samplers, and a session driven by a sampler callable."""
import numpy as np
import pytest

from infmllm_gguf import StreamSession
from infmllm_gguf.generation import LogprobSampler, StreamingDetokenizer, log_softmax, text_pieces
from infmllm_gguf.runtime import Model

MULTILINGUAL = "Спасибо! ありがとう。谢谢 — merci, ευχαριστώ, धन्यवाद 🙏 done"


@pytest.fixture(scope="module")
def model(default_model):
    with Model(default_model) as m:
        yield m


def test_characters_split_across_tokens_come_out_whole(model):
    tokens = model.tokenize(MULTILINGUAL, add_special=False)
    split = [t for t in tokens if model.token_bytes(t).decode("utf-8", errors="replace").count("\ufffd")]
    assert len(split) > 5  # the byte-level tokenizer cuts these characters: the case that matters
    detok = StreamingDetokenizer(model.token_bytes)
    pieces = [detok.add(t) for t in tokens]
    assert "".join(pieces) == MULTILINGUAL
    assert not any("\ufffd" in p for p in pieces)


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    byte_values = list(printable)
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars)}


def test_the_detokenizer_agrees_with_the_gguf_vocabulary(default_model, model):
    """The reference, independent of llama.cpp: each token's bytes read from the GGUF's own
    vocabulary (GPT-2 byte-level BPE) with the `gguf` package, the whole sequence decoded at once."""
    from gguf import GGUFReader

    reader = GGUFReader(default_model)
    field = reader.get_field("tokenizer.ggml.tokens")
    vocab = [bytes(field.parts[i]).decode() for i in field.data]
    kinds = reader.get_field("tokenizer.ggml.token_type")
    normal = np.flatnonzero(np.array([kinds.parts[i][0] for i in kinds.data]) == 1)  # not control tokens
    decoder = gpt2_byte_decoder()
    rng = np.random.default_rng(0)
    for _ in range(20):  # random token sequences: characters split, held back, cut off at the end
        tokens = rng.choice(normal, 40).tolist()
        detok = StreamingDetokenizer(model.token_bytes)
        ours = "".join(detok.add(t) for t in tokens)
        reference = bytes(decoder[c] for t in tokens for c in vocab[t]).decode("utf-8", errors="replace")
        # the same text, less what an unfinished last character gives
        assert reference.startswith(ours) and set(reference[len(ours):]) <= {"\ufffd"}, tokens


def test_a_character_cut_off_at_the_end_is_dropped(model):
    tokens = model.tokenize("ok ありがとう", add_special=False)
    detok = StreamingDetokenizer(model.token_bytes)
    text = "".join(detok.add(t) for t in tokens[:-1])  # the last character's final byte never comes
    assert "\ufffd" not in text and "ありがと".startswith(text[3:]) and text.startswith("ok ")


def pieces_of(words, stop):
    detok = StreamingDetokenizer(lambda w: w.encode())
    return list(text_pieces(iter(words), detok, stop))


def test_stop_strings():
    assert "".join(pieces_of(["Hello", " wor", "ld", "! END", " more"], ["END"])) == "Hello world! "
    assert "".join(pieces_of(["a", "b", "c"], ["bc", "zz"])) == "a"           # across pieces
    assert "".join(pieces_of(["no", " stop", " here"], ["xyz"])) == "no stop here"
    # nothing that could still become a stop string is yielded early
    assert pieces_of(["ab", "c", "d"], ["cd"]) == ["a", "b"]
    # a stop string of several-byte characters, split across tokens
    detok = StreamingDetokenizer(lambda b: b)
    data = "データ。停止。残り".encode()
    out = "".join(text_pieces((data[i:i + 1] for i in range(len(data))), detok, ["停止"]))
    assert out == "データ。"


def test_a_logprob_sampler_notes_what_it_picked_and_the_likeliest():
    logits = np.array([0.0, 3.0, 1.0, 2.9, 3.0], dtype=np.float32)
    noting = LogprobSampler(lambda _: 2, n_top=3)
    assert noting(logits) == 2
    z = logits.astype(np.float64)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert noting.last.token == 2 and noting.last.logprob == pytest.approx(np.log(p[2]), abs=1e-12)
    assert [t for t, _ in noting.last.top] == [1, 4, 3]  # a tie keeps the lower id first
    assert [lp for _, lp in noting.last.top] == pytest.approx(np.log(p[[1, 4, 3]]), abs=1e-12)
    assert LogprobSampler(lambda _: 0, n_top=0)(logits) == 0
    with pytest.raises(ValueError, match="logprobs"):
        LogprobSampler(lambda _: 0, n_top=-1)


def test_pieces_carry_their_tokens_logprobs_from_the_model(default_model):
    """Each token's log-probability is the model's at that step: the same as the logits read back
    when the same text is fed to a second session."""
    with StreamSession(default_model, budget=128, n_threads=1) as s:
        out = list(s.generate("Once upon a time", max_tokens=6, temperature=0, logprobs=2))
        noted = [t for p in out[:-1] for t in p.logprobs]
        assert len(noted) == 6 and out[-1].logprobs == ()
        assert all(t.top[0] == (t.token, t.logprob) for t in noted)  # greedy: the likeliest
        assert list(s.generate("Again", max_tokens=2, temperature=0))[0].logprobs is None  # not asked for
    with StreamSession(default_model, budget=128, n_threads=1) as ref:
        ref.feed_prompt("Once upon a time")
        for t in noted:
            assert t.logprob == pytest.approx(log_softmax(ref.runtime.logits())[t.token], abs=1e-4)
            ref.feed_tokens([t.token])


def test_generate_with_a_sampler_callable_streams_the_text_it_chose(default_model):
    """The sampler decides every token: the text is exactly those tokens' text, whole characters
    only, each token in the cache before its text is yielded."""
    with Model(default_model) as model:
        script = model.tokenize(MULTILINGUAL, add_special=False)
        with StreamSession(model, budget=256, chunk=64) as s:
            s.feed_text("Say thank you:")
            start = s.stats.tokens_seen
            chosen = iter(script)
            pieces = []
            for piece in s.generate(max_tokens=len(script), sampler=lambda logits: next(chosen)):
                pieces.append(piece)
                assert s.stats.tokens_seen > start
            assert "".join(pieces) == MULTILINGUAL and not any("\ufffd" in p for p in pieces)
            assert s.stats.tokens_seen == start + len(script)


def test_generate_feeds_its_prompt_when_called_and_yields_pieces_that_say_how_it_went(default_model):
    with StreamSession(default_model, budget=128, n_threads=1) as s:
        pieces = s.generate("Once upon a time", max_tokens=6, temperature=0)
        fed = s.stats.tokens_seen
        assert fed == len(s.model.tokenize("Once upon a time", add_special=True))  # before any piece is read
        out = list(pieces)
        assert all(isinstance(p, str) for p in out) and "".join(out) == "".join(p.text for p in out)
        *text, last = out
        assert last == "" and last.finish_reason == "length" and all(p.finish_reason is None for p in text)
        assert last.generation_tokens == 6 == s.stats.tokens_seen - fed and last.prompt_tokens == fed
        assert [p.token for p in text] == [p.token for p in text if p.token is not None] and text[-1].token >= 0
        assert last.prompt_tps > 0 and last.generation_tps > 0


def test_view_tokens_keeps_the_last_tokens(default_model):
    with StreamSession(default_model, budget=128, n_threads=1, view_tokens=16) as s:
        s.feed_text("One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                    "seventeen eighteen.")
        assert len(s.recent_view()) == 16
