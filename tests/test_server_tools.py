"""`infmllm-gguf serve`'s tool calls through the official `openai` client, on a real server process
over the default model (whose template knows no tools: the fallback prompt): required and named
calls valid against their schemas, streamed and whole alike, the tool's result sent back read as
a continuation (and kept across a restart), and every bad tools request a 400."""
import json

import jsonschema
import openai
import pytest

from server_process import ARGS, running

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                   "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tools") / "state"


@pytest.fixture(scope="module")
def server(default_model, state_dir):
    with running(ARGS, state_dir) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def valid_calls(calls, allowed=SCHEMAS):
    assert calls, "no tool call"
    for call in calls:
        assert call.function.name in allowed and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return calls


def streamed_calls(client, **request):
    """A streamed reply's tool calls, accumulated from their deltas as OpenAI's SDK documents it."""
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += (delta.function and delta.function.name) or ""
            entry["arguments"] += (delta.function and delta.function.arguments) or ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.slow
def test_required_calls_whole_and_streamed_alike_then_the_result_continues_the_conversation(client, server):
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    request = dict(model="any", messages=messages, tools=TOOLS, tool_choice="required", seed=7, temperature=0.7,
                   max_tokens=80)
    whole = client.chat.completions.create(**request)
    choice = whole.choices[0]
    calls = valid_calls(choice.message.tool_calls)
    assert choice.finish_reason == "tool_calls"
    streamed, finish = streamed_calls(client, **request)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c.function.name, c.function.arguments) for c in calls]
    # the client appends the call and the tool's result: the server reads only those (in the
    # conversation of either request: the two hold the same messages)
    history = messages + [choice.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": '{"celsius": 3}'} for c in calls]
    after = client.chat.completions.create(model="any", messages=history, tools=TOOLS, max_tokens=6, temperature=0)
    assert 0 < after.usage.prompt_tokens < 40 * len(calls), after.usage  # the results' turn, not the history
    assert after.model_extra["cache"]["tokens_seen"] > whole.model_extra["cache"]["tokens_seen"] > 200


@pytest.mark.slow
def test_a_named_function_is_the_one_called(client):
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What is 2 plus 40?"}], tools=TOOLS, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False, seed=1)
    (call,) = valid_calls(reply.choices[0].message.tool_calls, {"add"})
    assert call.function.name == "add"


@pytest.mark.slow
def test_none_and_no_tools_answer_text(client):
    for tools in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Say hi."}],
                                               max_tokens=8, temperature=0, **tools)
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason != "tool_calls"


@pytest.mark.parametrize("tools, choice, param", [
    ([WEATHER], {"type": "function", "function": {"name": "nowhere"}}, "tool_choice"),
    ([WEATHER, WEATHER], "auto", "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "bad name"}}], "auto", "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "^a{100000000}$"}}}}}], "auto", "tools"),
    (None, "required", "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
])
def test_bad_tools_are_400_naming_the_field(client, tools, choice, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], tools=tools,
                                       tool_choice=choice, max_tokens=2)
    assert caught.value.body["param"] == param


@pytest.mark.parametrize("messages", [
    [{"role": "tool", "tool_call_id": "x", "content": "42"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None,
                                         "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f"}}]},
     {"role": "tool", "tool_call_id": "x", "content": "42"}],
])
def test_malformed_tool_messages_are_400(client, messages):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="any", messages=messages, tools=TOOLS, max_tokens=2)


@pytest.mark.slow
def test_a_tools_conversation_killed_comes_back_with_its_tools_and_results(tmp_path, default_model):
    """A call and its result, then kill -9 before any snapshot: the restarted server replays the log,
    the tools rendered before the conversation again, and continues it."""
    state, headers = tmp_path / "state", {"X-Session-Id": "tools"}
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    with running(ARGS, state) as server:
        status, reply, _ = server.post("/v1/chat/completions", {"messages": messages, "tools": TOOLS, "max_tokens": 60,
                                                                "tool_choice": "required", "seed": 2}, headers=headers)
        assert status == 200
        call = reply["choices"][0]["message"]
        messages += [call, {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "RESULT-7731"}]
        status, _, _ = server.post("/v1/chat/completions", {"messages": messages, "tools": TOOLS, "max_tokens": 4,
                                                             "temperature": 0}, headers=headers)
        assert status == 200
        server.proc.kill()  # SIGKILL: no shutdown, no snapshot (the conversation is 2 s from idle)
        server.proc.wait(timeout=30)
    with running(ARGS, state) as server:
        status, _, _ = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Thanks."}],
                                                             "tools": TOOLS, "max_tokens": 4, "temperature": 0},
                                   headers=headers)
        assert status == 200
        view = server.get("/v1/sessions/tools")[1]
        text = "".join(piece for _, piece, _ in view["view"])
        assert view["messages"] == 6
        assert "<tool_response>\nRESULT-7731\n</tool_response>" in text and call["tool_calls"][0]["function"]["name"] in text
