"""Tool calls (infmllm_gguf/tools.py): the request's checks, the call grammar, the reply's parse
whole and streamed, the rendering of a conversation with tools (the template's own and the
fallback), and calls made by real models."""
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from infmllm_gguf import StreamSession
from infmllm_gguf.chat import ChatTranscript
from infmllm_gguf.model_files import qwen_model_path
from infmllm_gguf.openai_format import InvalidRequest
from infmllm_gguf.tools import CallStream, ToolUse, fallback_messages, knows_tools, parse_reply, tools_renderer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.mark.parametrize("tools, choice, message", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tools does not declare"),
    ([WEATHER, WEATHER], None, "declared twice"),
    ([{"type": "function", "function": {"name": "a b"}}], None, "letters, digits"),
    ([{"type": "retrieval"}], None, "a tool is"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"$ref": "#/nowhere"}}}}}], None, "tools"),
    (None, "required", "tool_choice needs tools"),
    ([WEATHER], "sometimes", "tool_choice is"),
])
def test_bad_tools_are_refused_with_the_field_named(tools, choice, message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        ToolUse.of(tools, choice)
    assert caught.value.param.startswith(("tools", "tool_choice"))


def test_a_named_choice_constrains_to_that_function_alone():
    use = ToolUse.of(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert use.choice == "required" and use.forced == "add"
    grammar = use.sampling()["grammar"]
    assert '"\\"add\\""' in grammar and "get_weather" not in grammar
    assert ToolUse.of(TOOLS, "none").sampling() == {} and ToolUse.of(None, None) is None


REPLY = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}\n'
         '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 40}}\n</tool_call>')


def streamed(pieces):
    """The deltas of `pieces`, accumulated as an OpenAI client does: (content, [(name, arguments)])."""
    stream, content, calls = CallStream(SCHEMAS), "", {}
    for delta in [d for p in pieces for d in stream.feed(p)] + list(stream.finish()):
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            entry["name"] += call.get("function", {}).get("name", "")
            entry["arguments"] += call["function"]["arguments"]
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


def test_streamed_calls_equal_the_whole_reply_parsed_at_every_split():
    content, calls = parse_reply(REPLY, SCHEMAS)
    assert content == "Let me look." and [c.name for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0].arguments) == {"city": "Zürich", "unit": "celsius"}
    whole = [(c.name, c.arguments) for c in calls]
    for i in range(len(REPLY)):
        for j in range(i, len(REPLY), 7):
            text, got = streamed([REPLY[:i], REPLY[i:j], REPLY[j:]])
            assert got == whole and text.strip() == content, (i, j)


def test_a_close_tag_inside_an_argument_string_does_not_end_the_call():
    """The call grammar lets "</tool_call>" into a string: the block is the JSON value it holds (it
    was cut at the tag inside the string, and the reply, a valid call, came back as text)."""
    reply = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "a </tool_call> b", "unit": "celsius"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    content, calls = parse_reply(reply, SCHEMAS)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "a </tool_call> b", "unit": "celsius"}), ("add", {"a": 1, "b": 2})]
    whole = [(c.name, c.arguments) for c in calls]
    for i in range(len(reply)):
        assert streamed([reply[:i], reply[i:]]) == ("", whole), i


@pytest.mark.parametrize("reply", ["Just text, no call.", "<tool_call>\nnot json\n</tool_call>", "a < b <tool_c",
                                   '<tool_call>\n{"name": "undeclared", "arguments": {}}\n</tool_call>',
                                   '{"name": "Ann", "arguments": "a JSON answer, not a call"}', "``` code ```"])
def test_a_reply_without_a_valid_call_stays_text(reply):
    assert parse_reply(reply, SCHEMAS) == (reply, [])
    for i in range(len(reply)):
        assert streamed([reply[:i], reply[i:]]) == (reply, [])


@pytest.mark.parametrize("reply", ['{"name": "add", "arguments": {"a": 1, "b": 2}}',
                                   '```json\n{"name": "add",\n "arguments": {"a": 1, "b": 2}}\n```\n'])
def test_a_reply_that_is_one_bare_call_is_that_call(reply):
    """As small models answer when `auto` has not triggered the grammar (no <tool_call> written)."""
    content, (call,) = parse_reply(reply, SCHEMAS)
    assert content is None and (call.name, json.loads(call.arguments)) == ("add", {"a": 1, "b": 2})
    for i in range(len(reply)):
        text, calls = streamed([reply[:i], reply[i:]])
        assert text == "" and [(n, json.loads(a)) for n, a in calls] == [("add", {"a": 1, "b": 2})]


class ChatML:
    """ChatML in Python, as SmolLM2's template (no tools)."""

    def __call__(self, messages, add_assistant):
        text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
        return text + ("<|im_start|>assistant\n" if add_assistant else "")


def qwen_jinja():
    """Qwen2.5's own template (Qwen2.5-Coder-0.5B-Instruct's GGUF metadata, Apache-2.0, kept in
    tests/data), run as llama-cpp-python runs it."""
    template = (Path(__file__).parent / "data" / "qwen2.5-chat-template.jinja").read_text()
    formatters = {opens: Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="", add_generation_prompt=opens)
                  for opens in (False, True)}

    def render(messages, add_assistant, tools=None):
        return formatters[add_assistant](messages=[{"role": r, "content": c} for r, c in messages], tools=tools).prompt
    return template, render


ROUNDS = [[("user", "Weather in Paris and 2 + 40?")],
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 40}}\n</tool_call>',
          [("tool", '{"temperature": 21}'), ("tool", "42")], "It is 21 degrees; 2 + 40 = 42.",
          [("user", "Thanks!")], "You are welcome.", [("user", "Bye")]]


@pytest.mark.parametrize("renderer", ["qwen", "fallback"])
def test_a_conversation_with_tool_rounds_fed_turn_by_turn_is_the_whole_rendering(renderer):
    """Calls, two tool results in a row and later turns, each fed as the stream feeds them: what
    was fed is the whole conversation rendered at once (the template's own tools section, or the
    fallback's system message), and the transcript renders only its last round."""
    if renderer == "qwen":
        template, render_jinja = qwen_jinja()
        assert knows_tools(template)
        base = lambda messages, opens: render_jinja(messages, opens)  # noqa: E731
    else:
        template, base, render_jinja = None, ChatML(), None
    transcript = ChatTranscript(base, tools_renderer(base, render_jinja, template))
    fed, whole = "", [("system", "Be brief.")]
    for i, step in enumerate(ROUNDS):
        if isinstance(step, list):
            new = transcript.turn(step, system="Be brief.", tools=TOOLS if i == 0 else None)
            transcript.record_fed(new)
            whole += step
        else:
            transcript.reply(step)
            new = step
            whole.append(("assistant", step))
        fed += new
    if renderer == "qwen":
        expected = render_jinja(whole, True, tools=TOOLS)
        assert "# Tools" in fed and '<tool_response>\n{"temperature": 21}\n</tool_response>\n<tool_response>' in fed
    else:
        expected = base(fallback_messages(whole, TOOLS), True)
        assert fed.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and "<|im_start|>user\n<tool_response>" in fed
    assert fed == expected
    assert len(transcript.last) <= 3  # the last round and its reply, not the conversation
    with pytest.raises(ValueError, match="tools are declared at the start"):
        transcript.turn([("user", "again")], tools=[ADD])


def check_calls(text, allowed):
    content, calls = parse_reply(text, allowed)
    assert calls, f"no call in {text!r}"
    for call in calls:
        assert call.name in allowed
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return calls


def test_required_and_named_calls_of_a_model_whose_template_knows_no_tools(default_model):
    """SmolLM2 (the fallback prompt): every call names a declared tool, its arguments valid."""
    with StreamSession(default_model, budget=512, n_threads=2, memory=False) as s:
        text = s.chat("What is the weather in Oslo?", tools=TOOLS, tool_choice="required", temperature=0.8,
                      seed=3, max_tokens=80)
        check_calls(text, SCHEMAS)
        assert "# Tools" in s.transcript.fed
        text = s.chat("Now add 3 and 4.", tools=TOOLS, max_tokens=60, temperature=0.8, seed=4,
                      tool_choice={"type": "function", "function": {"name": "add"}})
        assert [c.name for c in check_calls(text, {"add"})] == ["add"]


@pytest.mark.skipif(not qwen_model_path().exists(), reason="Qwen2.5-Coder-0.5B is not fetched (python -m "
                                                            "infmllm_gguf.model_files fetch qwen2.5-0.5b)")
def test_qwen_calls_the_tool_and_reads_its_result():
    """Qwen2.5-Coder-0.5B, its own template: a required call names the right tool with valid
    arguments; the result goes back as a tool message and the reply after it is text."""
    with StreamSession(qwen_model_path(), budget=1024, n_threads=2, memory=False) as s:
        text = s.chat("What is the weather in Paris, in celsius?", tools=TOOLS, tool_choice="required",
                      temperature=0, max_tokens=60)
        (call,) = check_calls(text, {"get_weather"})
        assert json.loads(call.arguments)["city"] == "Paris"
        reply = s.chat([("tool", '{"temperature": 21, "unit": "celsius"}')], temperature=0, max_tokens=30)
        assert parse_reply(reply, SCHEMAS)[1] == [] and reply.strip()
        assert '<|im_start|>user\n<tool_response>\n{"temperature": 21' in s.transcript.fed


def test_auto_holds_the_reply_to_the_grammar_from_the_first_call_on(default_model):
    """`auto`'s lazy grammar, on llama.cpp's sampler with scripted logits: before `<tool_call>` any
    token goes (a word no call holds is kept), from it on the likeliest token is refused wherever
    the call grammar forbids it, and the call comes out valid."""
    from infmllm_gguf.runtime import ChainSampler, Model, SamplerOptions

    with Model(default_model) as model:
        options = SamplerOptions(temperature=0, **ToolUse.of(TOOLS, "auto").sampling())
        assert options.grammar_triggers == ("<tool_call>",)
        with ChainSampler(model, options) as sampler:
            def pick(token: int) -> int:  # logits that favour `token` most, then "Paris" tokens, then the rest
                logits = np.zeros(model.n_vocab, np.float32)
                logits[paris] = 5.0
                logits[token] = 10.0
                return sampler(logits)
            paris = model.tokenize("Paris", add_special=False)
            wrong = model.tokenize("[", add_special=False)[0]
            free = model.tokenize("Sure, ``` x", add_special=False) + [wrong]
            assert [pick(t) for t in free] == free  # no grammar yet
            call = model.tokenize('<tool_call>\n{"name": "get_weather", "arguments": ', add_special=False)
            assert [pick(t) for t in call] == call  # the grammar's own way
            assert pick(wrong) != wrong  # the arguments are an object: "[" is refused here
