"""`infmllm_gguf.Llama` against llama-cpp-python's `Llama` itself: the same calls, the same dicts and
stream chunks; and a script written for llama-cpp-python that fails there past the context runs
through the facade unchanged."""
import llama_cpp
import numpy as np
import pytest

from infmllm_gguf import Llama

OPTIONS = dict(n_threads=1, seed=0, verbose=False)


def shape(value):
    """A value's structure: dict keys and value types, recursively (ids and times aside)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return "float"  # llama-cpp-python's chat logprobs are numpy.float32
    return type(value).__name__


def calls(llm) -> dict:
    """The calls that code written for llama-cpp-python makes, greedy."""
    chat = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]
    return {
        "completion": llm.create_completion("The capital of France is", max_tokens=8, temperature=0),
        "call": llm("Once upon a time", max_tokens=6, temperature=0, stop=["."]),
        "completion stream": list(llm.create_completion("The capital of France is", max_tokens=8, temperature=0,
                                                        stream=True)),
        "chat": llm.create_chat_completion(messages=chat, max_tokens=8, temperature=0),
        "chat stream": list(llm.create_chat_completion(messages=chat, max_tokens=8, temperature=0, stream=True)),
    }


@pytest.fixture(scope="module")
def both(default_model):
    theirs = llama_cpp.Llama(model_path=str(default_model), n_ctx=1024, **OPTIONS)
    with Llama(model_path=str(default_model), n_ctx=1024, **OPTIONS) as ours:
        yield calls(theirs), calls(ours)
    theirs.close()


@pytest.mark.slow  # llama-cpp-python's own calls take ~20 s here (the module's fixture)
def test_the_same_calls_return_the_same_dicts(both):
    theirs, ours = both
    for name in ("completion", "call", "chat"):
        assert shape(ours[name]) == shape(theirs[name]), name
        assert ours[name]["object"] == theirs[name]["object"]
    assert ours["completion"]["choices"][0]["text"] == theirs["completion"]["choices"][0]["text"]
    assert ours["call"]["choices"][0]["text"] == theirs["call"]["choices"][0]["text"]
    assert ours["chat"]["choices"][0]["message"] == theirs["chat"]["choices"][0]["message"]
    for name in ("completion", "call", "chat"):
        for key in ("finish_reason",):
            assert ours[name]["choices"][0][key] == theirs[name]["choices"][0][key], name
        assert ours[name]["usage"]["completion_tokens"] == theirs[name]["usage"]["completion_tokens"], name
    assert ours["completion"]["usage"] == theirs["completion"]["usage"]


@pytest.mark.slow
def test_the_same_calls_stream_the_same_chunks(both):
    theirs, ours = both
    for name, field in (("completion stream", "text"), ("chat stream", "delta")):
        a, b = theirs[name], ours[name]
        assert [shape(c) for c in b[:1] + b[-1:]] == [shape(c) for c in a[:1] + a[-1:]], name
        assert {c["object"] for c in b} == {c["object"] for c in a}
        assert b[-1]["choices"][0]["finish_reason"] == a[-1]["choices"][0]["finish_reason"] is not None
    def joined(chunks, get):
        return "".join(get(c["choices"][0]) or "" for c in chunks)
    assert joined(ours["completion stream"], lambda c: c["text"]) == \
        joined(theirs["completion stream"], lambda c: c["text"]) == ours["completion"]["choices"][0]["text"]
    assert ours["chat stream"][0]["choices"][0]["delta"] == {"role": "assistant"}
    assert joined(ours["chat stream"], lambda c: c["delta"].get("content")) == \
        joined(theirs["chat stream"], lambda c: c["delta"].get("content"))


def chat_for_a_while(Llama, model_path, turns=24):
    """A script written for llama-cpp-python: a conversation resent whole each turn."""
    llm = Llama(model_path=model_path, n_ctx=256, n_threads=1, seed=0, verbose=False)
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    replies = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"Tell me one fact about the number {i}."})
        r = llm.create_chat_completion(messages=messages, max_tokens=16, temperature=0)
        replies.append(r["choices"][0]["message"]["content"])
        messages.append({"role": "assistant", "content": replies[-1]})
    return llm, replies


@pytest.mark.slow
def test_a_llama_cpp_python_script_runs_past_the_context(default_model):
    with pytest.raises(ValueError, match="exceed context window of 256"):
        chat_for_a_while(llama_cpp.Llama, str(default_model))
    llm, replies = chat_for_a_while(Llama, str(default_model))
    with llm:
        st = llm._session.stats
        assert len(replies) == 24 and all(replies)
        assert st.cells_cached <= 256 and st.cells_evicted > 0
        # only the new messages were read each turn, not the whole history again (the memory's
        # re-reads of earlier turns are counted apart)
        assert st.tokens_seen - llm._session.memory.stats.tokens_recalled < 24 * 60


def test_options_it_does_not_implement_are_refused_not_ignored(default_model):
    with Llama(model_path=str(default_model), n_ctx=256, **OPTIONS) as llm:
        llm.create_completion("Hi", max_tokens=2, frequency_penalty=0.0, repeat_penalty=1.0)  # defaults pass
        with pytest.raises(ValueError, match="repeat_penalty"):
            llm.create_completion("Hi", max_tokens=2, repeat_penalty=1.1)
        with pytest.raises(ValueError, match="grammar"):
            llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], grammar=object())
        with pytest.raises(TypeError, match="unexpected keyword argument 'banana'"):
            llm.create_completion("Hi", banana=1)
        with pytest.raises(ValueError, match="the last message must be the user's"):
            llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}])
        # llama-cpp-python's "random seed" (was: numpy's "expected non-negative integer")
        assert llm.create_completion("Hi", max_tokens=2, seed=-1)["choices"][0]["finish_reason"]
    with pytest.raises(TypeError, match="lora_path"):
        Llama(model_path=str(default_model), lora_path="x.gguf")


def test_logprobs_match_llama_cpp_python(default_model):
    """The tokens' log-probabilities, as llama-cpp-python computes them from its own logits."""
    theirs = llama_cpp.Llama(model_path=str(default_model), n_ctx=512, logits_all=True, **OPTIONS)
    ask = dict(max_tokens=6, temperature=0)
    chat = [{"role": "user", "content": "Name a colour."}]
    a = {"completion": theirs.create_completion("The capital of France is", logprobs=3, **ask),
         "chat": theirs.create_chat_completion(messages=chat, logprobs=True, top_logprobs=2, **ask),
         "stream": list(theirs.create_completion("The capital of France is", logprobs=3, stream=True, **ask))}
    theirs.close()
    with Llama(model_path=str(default_model), n_ctx=512, logits_all=True, **OPTIONS) as llm:
        b = {"completion": llm.create_completion("The capital of France is", logprobs=3, **ask),
             "chat": llm.create_chat_completion(messages=chat, logprobs=True, top_logprobs=2, **ask),
             "stream": list(llm.create_completion("The capital of France is", logprobs=3, stream=True, **ask)),
             "none": llm.create_chat_completion(messages=chat, logprobs=True, **ask)}
    ours, ref = b["completion"]["choices"][0]["logprobs"], a["completion"]["choices"][0]["logprobs"]
    assert ours["tokens"] == ref["tokens"] and len(ours["tokens"]) == 6
    assert ours["text_offset"] == ref["text_offset"]
    assert ours["token_logprobs"] == pytest.approx(ref["token_logprobs"], abs=2e-3)
    for mine, theirs_top in zip(ours["top_logprobs"], ref["top_logprobs"]):
        assert mine.keys() == theirs_top.keys()
        assert list(mine.values()) == pytest.approx(list(theirs_top.values()), abs=2e-3)
    ours, ref = b["chat"]["choices"][0]["logprobs"], a["chat"]["choices"][0]["logprobs"]
    assert shape(ours) == shape(ref)
    assert [c["token"] for c in ours["content"]] == [c["token"] for c in ref["content"]]
    assert [c["logprob"] for c in ours["content"]] == pytest.approx([c["logprob"] for c in ref["content"]], abs=2e-3)
    def streamed(chunks, key):
        return sum((c["choices"][0]["logprobs"][key] for c in chunks if c["choices"][0]["logprobs"]), [])
    for key in ("tokens", "text_offset"):
        assert streamed(b["stream"], key) == streamed(a["stream"], key) == a["completion"]["choices"][0]["logprobs"][key]
    assert b["none"]["choices"][0]["logprobs"] is None  # top_logprobs unset: none, as llama-cpp-python
