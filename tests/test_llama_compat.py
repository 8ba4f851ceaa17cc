"""`infmllm_gguf.Llama` against llama-cpp-python's `Llama` itself: the same calls, the same dicts and
stream chunks, the same sampled replies under every sampling option, the same embeddings; a script
written for llama-cpp-python that fails there past the context runs through the facade unchanged;
states saved and loaded, echo, and bad input refused with the stream left as it was."""
import json
import pickle

import llama_cpp
import numpy as np
import pytest

from infmllm_gguf import Llama

# one thread: two cores shared, where llama.cpp's threads spin at their barriers (llama-cpp-python
# reads a prompt with n_threads_batch, all cores unless told)
OPTIONS = dict(n_threads=1, n_threads_batch=1, seed=0, verbose=False)


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
    llm = Llama(model_path=model_path, n_ctx=256, n_threads=1, n_threads_batch=1, seed=0, verbose=False)
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


# -- sampling, as llama-cpp-python samples -----------------------------------------------------
STORY = "Once upon a time, in a small village,"
COUNT = "Count: one, two, one, two, one,"


@pytest.fixture(scope="module")
def pair(default_model):
    """Ours and llama-cpp-python's, the same model and seed."""
    options = {**OPTIONS, "seed": 11}
    theirs = llama_cpp.Llama(model_path=str(default_model), n_ctx=256, **options)
    with Llama(model_path=str(default_model), n_ctx=256, **options) as ours:
        yield ours, theirs
    theirs.close()


def replies(llm, calls: dict, prompt=STORY, max_tokens=12) -> dict:
    llm.set_seed(11)
    return {name: llm.create_completion(prompt, max_tokens=max_tokens, **options)["choices"][0]["text"]
            for name, options in calls.items()}


def test_each_sampling_option_samples_as_llama_cpp_python(pair):
    """llama.cpp's chain built and seeded as llama-cpp-python builds and seeds it: each option's
    reply is llama-cpp-python's, and differs from the reply without the option (it did something).
    Seedless requests draw their seeds from the last one, as llama-cpp-python's do."""
    ours, theirs = pair
    first = ours.tokenize(b" there", add_bos=False)[0]  # the greedy reply's first token
    calls = {"greedy": dict(temperature=0), "logit_bias": dict(temperature=0, logit_bias={str(first): -100.0}),
             "sampled": dict(temperature=1.0, seed=3), "typical_p": dict(temperature=1.0, seed=3, typical_p=0.3),
             "top_p": dict(temperature=1.0, seed=3, top_p=0.5), "top_k": dict(temperature=1.0, seed=3, top_k=2),
             "min_p": dict(temperature=1.0, seed=3, min_p=0.3),
             "mirostat 1": dict(temperature=1.0, seed=3, mirostat_mode=1, mirostat_tau=3.0),
             "mirostat 2": dict(temperature=1.0, seed=3, mirostat_mode=2, mirostat_tau=3.0),
             "seedless": dict(temperature=1.0), "seedless again": dict(temperature=1.0)}
    mine = replies(ours, calls)
    assert mine == replies(theirs, calls)
    assert mine["logit_bias"] != mine["greedy"] and not mine["logit_bias"].startswith(" there")
    for name in ("typical_p", "top_p", "top_k", "min_p", "mirostat 1", "mirostat 2", "seedless"):
        assert mine[name] != mine["sampled"], name
    assert mine["seedless"] != mine["seedless again"]
    penalties = {"none": dict(temperature=0),
                 "penalties": dict(temperature=0, repeat_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.5)}
    mine = replies(ours, penalties, COUNT, max_tokens=16)
    assert mine == replies(theirs, penalties, COUNT, max_tokens=16)
    assert mine["penalties"] != mine["none"]


def test_a_grammar_constrains_the_reply_as_in_llama_cpp_python(pair):
    ours, theirs = pair
    grammar = llama_cpp.LlamaGrammar.from_string('root ::= "red" | "green" | "blue" | "yellow"')
    calls = {f"seed {seed}": dict(temperature=1.0, seed=seed, grammar=grammar) for seed in range(6)}
    mine = replies(ours, calls, "My favourite colour is ")
    assert mine == replies(theirs, calls, "My favourite colour is ")
    assert set(mine.values()) <= {"red", "green", "blue", "yellow"} and len(set(mine.values())) > 1
    gbnf = ours.create_completion("Is the sky blue? ", grammar='root ::= "yes" | "no"', seed=1, max_tokens=8)
    assert gbnf["choices"][0]["text"] in ("yes", "no") and gbnf["choices"][0]["finish_reason"] == "stop"


def test_a_json_response_format_parses(pair):
    ours, _ = pair
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    reply = ours.create_chat_completion(ask, max_tokens=60, seed=2,
                                        response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    value = json.loads(reply["choices"][0]["message"]["content"])
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and len(value["name"]) <= 16
    anything = ours.create_chat_completion(ask, max_tokens=60, seed=2, response_format={"type": "json_object"})
    assert isinstance(json.loads(anything["choices"][0]["message"]["content"]), dict)


def test_logits_processors_and_stopping_criteria_see_what_llama_cpp_pythons_see(pair):
    """A processor that forbids the greedy reply's first token keeps it out, as a -inf logit bias
    does; the processors' input_ids (a chat's rendered prompt, then the reply) and a criterion
    that stops after three tokens agree with llama-cpp-python's."""
    ours, theirs = pair
    first = ours.tokenize(b" there", add_bos=False)[0]

    def forbid(input_ids, scores):
        scores[first] = -np.inf
        return scores

    def run(llm):
        seen = []

        def note(input_ids, scores):
            seen.append(input_ids.copy())
            return scores
        forbidden = llm.create_completion(STORY, max_tokens=12, temperature=0,
                                          logits_processor=llama_cpp.LogitsProcessorList([forbid]))
        llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
                                   logits_processor=llama_cpp.LogitsProcessorList([note]))
        three = llama_cpp.StoppingCriteriaList([lambda input_ids, logits: len(input_ids) >= n_prompt + 3])
        stopped = llm.create_completion(COUNT, max_tokens=16, temperature=0, stopping_criteria=three)
        return forbidden["choices"][0]["text"], seen, stopped
    n_prompt = len(ours.tokenize(COUNT.encode()))
    (text, seen, stopped), (their_text, their_seen, their_stopped) = run(ours), run(theirs)
    assert text == their_text and first not in ours.tokenize(text.encode(), add_bos=False)
    assert text == ours.create_completion(STORY, max_tokens=12, temperature=0,
                                          logit_bias={first: float("-inf")})["choices"][0]["text"]
    assert [ids.tolist() for ids in seen] == [ids.tolist() for ids in their_seen]
    assert [len(ids) for ids in seen] == [len(seen[0]) + i for i in range(3)] and seen[0].dtype == np.intc
    assert stopped["choices"][0]["text"] == their_stopped["choices"][0]["text"]
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 3


def test_echo_returns_the_prompt(pair):
    ours, _ = pair
    plain = ours.create_completion(STORY, max_tokens=6, temperature=0)["choices"][0]["text"]
    echoed = ours.create_completion(STORY, max_tokens=6, temperature=0, echo=True)["choices"][0]["text"]
    assert echoed == STORY + plain
    chunks = list(ours.create_completion(STORY, max_tokens=6, temperature=0, echo=True, stream=True))
    assert chunks[0]["choices"][0]["text"] == STORY
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed


# -- state ---------------------------------------------------------------------------------------
def test_a_saved_state_continues_the_same_and_pickles(default_model):
    chat = [{"role": "user", "content": "Tell me about cats."}]
    with Llama(model_path=str(default_model), n_ctx=128, n_threads=1, seed=5, verbose=False) as llm:
        first = llm.create_chat_completion(chat, max_tokens=24, temperature=0)["choices"][0]["message"]
        state = llm.save_state()
        assert state.llama_state_size == len(state.llama_state) > 0 and state.n_tokens > 0
        follow = chat + [first, {"role": "user", "content": "And dogs?"}]
        seen = llm._session.stats.tokens_seen

        def ask():  # a continuation (reads only the new message), sampled without a seed
            return llm.create_chat_completion(follow, max_tokens=24, temperature=1.0)["choices"][0]["message"]
        before = ask()
        assert llm._session.stats.tokens_seen - seen < 60, "the state's conversation was read again"
        assert ask() != before  # the stream and the seed moved on
        llm.load_state(state)
        assert ask() == before
        llm.load_state(pickle.loads(pickle.dumps(state)))
        assert ask() == before
        llm.reset()
        assert llm._session.stats.tokens_seen == 0
    with Llama(model_path=str(default_model), n_ctx=128, n_threads=1, verbose=False) as other:
        other.load_state(state)
        assert other.create_chat_completion(follow, max_tokens=24, temperature=1.0)["choices"][0]["message"] == before
    with Llama(model_path=str(default_model), n_ctx=96, n_threads=1, verbose=False) as smaller:
        with pytest.raises(ValueError, match="other settings"):
            smaller.load_state(state)


# -- embeddings ------------------------------------------------------------------------------------
TEXTS = ["The cat sat on the mat.", "A completely different sentence about the stock market."]


@pytest.mark.parametrize("pooling", [None, llama_cpp.LLAMA_POOLING_TYPE_MEAN])
def test_embeddings_are_llama_cpp_pythons(default_model, pooling):
    """The model's own pooling (none for SmolLM2: a vector per token) and mean pooling, against
    llama-cpp-python's `Llama(embedding=True)`. Its texts one at a time: it reads a list of them in
    one batch, and with no pooling reads the second text's vectors from the wrong place (its offset
    counts tokens, not floats)."""
    # n_batch 64: the longest text embedded (llama-cpp-python's rule: min(n_ctx, n_batch) tokens)
    options = dict(n_batch=64, n_threads=1, n_threads_batch=1, verbose=False,
                   **({} if pooling is None else {"pooling_type": pooling}))
    reference = llama_cpp.Llama(model_path=str(default_model), embedding=True, **options)
    expected = [reference.embed(text, normalize=True) for text in TEXTS]
    expected_response = reference.create_embedding(TEXTS[0])
    counted = sum(len(reference.tokenize(text.encode())) for text in TEXTS)
    reference.close()
    with Llama(model_path=str(default_model), **options) as llm:
        got, count = llm.embed(TEXTS, normalize=True, return_count=True)
        response = llm.create_embedding(TEXTS[0])
        raw = np.asarray(llm.embed(TEXTS[0]))
        with pytest.raises(ValueError, match="exceed batch size of 64"):
            llm.embed("word " * 80, truncate=False)
        long, n_embd = np.asarray(llm.embed("word " * 80)), llm.n_embd()
    assert long.shape == ((64, n_embd) if pooling is None else (n_embd,))
    assert count == counted
    for mine, theirs in zip(got, expected):
        assert np.asarray(mine).shape == np.asarray(theirs).shape
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    assert np.linalg.norm(raw, axis=-1).min() > 1.5  # not normalized unless asked
    assert shape(response) == shape(expected_response) and response["usage"] == expected_response["usage"]
    np.testing.assert_allclose(response["data"][0]["embedding"], expected_response["data"][0]["embedding"], atol=1e-4)


# -- what is refused -------------------------------------------------------------------------------
def test_bad_input_is_a_value_error_and_leaves_the_stream_as_it_was(default_model):
    with Llama(model_path=str(default_model), n_ctx=256, **OPTIONS) as llm:
        first = llm.create_completion(STORY, max_tokens=4, temperature=0)
        held = STORY + first["choices"][0]["text"]
        seen, cached = llm._session.stats.tokens_seen, llm._session.cached_stream_indices()
        bad = {"an invalid grammar": dict(grammar='root ::= "a" ('), "an undefined rule": dict(grammar="root ::= foo"),
               "a bias beyond the vocabulary": dict(logit_bias={llm.n_vocab(): 1.0}),
               "a bias that names no token": dict(logit_bias={"cat": 1.0}), "a grammar object": dict(grammar=object()),
               "mirostat 3": dict(mirostat_mode=3), "a negative temperature": dict(temperature=-1.0),
               "tail-free sampling": dict(tfs_z=0.9), "a suffix": dict(suffix="x"),
               "echo with logprobs": dict(echo=True, logprobs=2)}
        for name, options in bad.items():
            with pytest.raises(ValueError):
                llm.create_completion(held + " More.", max_tokens=2, **options)
            assert llm._session.stats.tokens_seen == seen, name
            assert np.array_equal(llm._session.cached_stream_indices(), cached), name
        chat = [{"role": "user", "content": "Hi"}]
        for options in (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}),
                        dict(response_format={"type": "xml"}), dict(grammar='root ::= "a"',
                                                                      response_format={"type": "json_object"}),
                        dict(tools=[{"type": "function", "function": {"name": "f"}}],
                             tool_choice={"type": "function", "function": {"name": "g"}}),
                        dict(tools=[{"type": "function", "function": {"name": "f g"}}]),
                        dict(tools=[{"type": "function", "function": {"name": "f"}}], grammar='root ::= "a"')):
            with pytest.raises(ValueError):
                llm.create_chat_completion(chat, max_tokens=2, **options)
            assert llm._session.stats.tokens_seen == seen
        with pytest.raises(ValueError, match="tail-free"):
            llm.create_completion(held, tfs_z=0.5)
        with pytest.raises(ValueError, match="beyond the vocabulary"):
            llm.create_completion(held, logit_bias={10**6: 1.0})
        with pytest.raises(TypeError, match="unexpected keyword argument 'banana'"):
            llm.create_completion("Hi", banana=1)
        with pytest.raises(ValueError, match="the last message must be the user's or a tool's"):
            llm.create_chat_completion(messages=chat + [{"role": "assistant", "content": "Hi"}])
        # the stream still holds the first reply: a continuation reads only its new part
        llm.create_completion(held + " More.", max_tokens=2, temperature=0)
        assert llm._session.stats.tokens_seen - seen <= 2 + len(llm.tokenize(b" More.", add_bos=False))
        # llama-cpp-python's "random seed" (was: numpy's "expected non-negative integer")
        assert llm.create_completion("Hi", max_tokens=2, seed=-1)["choices"][0]["finish_reason"]
    with pytest.raises(TypeError, match="lora_path"):
        Llama(model_path=str(default_model), lora_path="x.gguf")


def test_tool_calls_in_openai_shape_whole_and_streamed_and_their_results_read_as_a_continuation(default_model):
    """tools with tool_choice "required": a call of a declared tool with arguments its schema
    accepts, as `tool_calls` with finish_reason "tool_calls"; streamed, the same call in OpenAI's
    deltas; the client's history with the call and the tool's result sent back reads only the result."""
    import jsonschema

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    with Llama(model_path=str(default_model), n_ctx=512, memory=False, **OPTIONS) as llm:
        reply = llm.create_chat_completion(messages, tools=tools, tool_choice="required", seed=3, max_tokens=60)
        choice = reply["choices"][0]
        (call,) = choice["message"]["tool_calls"]
        assert choice["finish_reason"] == "tool_calls" and call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), tools[0]["function"]["parameters"])
        chunks = list(llm.create_chat_completion(messages, tools=tools, tool_choice="required", seed=3, max_tokens=60,
                                                 stream=True))
        deltas = [c["choices"][0]["delta"].get("tool_calls") for c in chunks]
        streamed = [d[0] for d in deltas if d]
        assert streamed[0]["id"].startswith("call_") and streamed[0]["function"]["name"] == "get_weather"
        assert "".join(d["function"]["arguments"] for d in streamed) == call["function"]["arguments"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        seen = llm._session.stats.tokens_seen
        result = {"role": "tool", "tool_call_id": streamed[0]["id"], "content": '{"celsius": 3}'}
        after = llm.create_chat_completion(messages + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": streamed[0]["id"], "type": "function", "function": call["function"]}]}, result], tools=tools,
            max_tokens=8, temperature=0)
        fed = llm._session.stats.tokens_seen - seen - after["usage"]["completion_tokens"]
        whole = len(llm.tokenize(llm._session.transcript.fed.encode(), add_bos=False, special=True))
        assert 0 < fed < 50 and whole > 200, (fed, whole)  # the result's turn, not the conversation again
        assert after["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
