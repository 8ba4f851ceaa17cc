"""Tool calls: OpenAI's `tools` and `tool_choice` over any model, in one call format.

A model calls a tool by writing, as Qwen2.5, Qwen3, Hermes and SmolLM3 chat templates ask,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call. Where the model's template knows tools in this format (it reads `tools` and
writes `<tool_call>`), the tools and the tool results (`role: tool`) are rendered by the template
itself (run by jinja2, as llama-cpp-python and HF transformers run it). Where it does not (SmolLM2,
Llama 3's JSON calls, Mistral's `[TOOL_CALLS]`), the documented fallback: the tools and the format
above are described in the system message (`FALLBACK_PROMPT`), and each tool result is shown as a
user message `<tool_response>\\n...\\n</tool_response>`.

The calls are constrained by a grammar made from each function's `parameters` schema (llama-cpp-
python's JSON-schema converter): `tool_choice` "required" or a named function applies it from the
reply's first token, "auto" from the first `<tool_call>` the model writes (a lazy grammar, as
llama-server's), so that every call names a declared tool with arguments its schema accepts;
"none" lets the model write text (a call it writes anyway stays text).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

from .errors import InvalidRequest

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CHOICES = ("none", "auto", "required")
_BARE_CALL = re.compile(r"^\s*(?:```(?:json)?\s*)?(\{.*\})\s*(?:```)?\s*$", re.S)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_JSON = json.JSONDecoder()

#: the system message's addition where the template does not know tools ({tools}: one JSON per line)
FALLBACK_PROMPT = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                   "with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each "
                   "function call, return a json object with function name and arguments within <tool_call></tool_call> "
                   "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


@dataclass(frozen=True)
class Tool:
    """A declared function: its name, what it does, and the JSON schema of its arguments."""
    name: str
    description: str
    parameters: Mapping[str, Any]

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` is the JSON text of its arguments (as OpenAI returns it)."""
    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def text(self) -> str:
        """The call as the model writes it (and as the stream holds a call a client sends back)."""
        return f'{CALL_OPEN}\n{{"name": {json.dumps(self.name, ensure_ascii=False)}, "arguments": {self.arguments}}}\n{CALL_CLOSE}'


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def message_text(message: Mapping, where: str) -> tuple[str, str]:
    """(role, text) of an OpenAI chat message with text content as the stream holds it: an
    assistant message's `tool_calls` as the model writes them, after its content if any (so that
    a reply sent back reads as the stream holds it); InvalidRequest for anything else."""
    role, content, calls = message.get("role"), message.get("content"), message.get("tool_calls")
    if role not in ("system", "developer", "user", "assistant", "tool") or not (
            isinstance(content, str) or role == "assistant" and content is None and calls):
        raise InvalidRequest(f"{where}: a system, user, assistant or tool message with text content is needed "
                             f"(got role {role!r}, content of type {type(content).__name__})", param=where)
    role = "system" if role == "developer" else role
    if not calls:
        return role, content
    if role != "assistant" or not isinstance(calls, Sequence):
        raise InvalidRequest(f"{where}: tool_calls are a list, in an assistant message", param=f"{where}.tool_calls")
    texts = [content] if content else []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        arguments = function.get("arguments") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise InvalidRequest(f"{where}.tool_calls[{i}]: a call is {{\"function\": {{\"name\", \"arguments\" "
                                 "(JSON text)}}", param=f"{where}.tool_calls[{i}]")
        texts.append(ToolCall(call.get("id", ""), name, arguments).text())
    return role, "\n".join(texts)


def checked_tools(tools: object, where: str = "tools") -> tuple[Tool, ...]:
    """OpenAI's `tools` list ({"type": "function", "function": {"name", "description",
    "parameters"}}) as `Tool`s; InvalidRequest for anything else, a duplicate name, or a
    `parameters` schema that the grammar converter cannot take."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not tools:
        raise InvalidRequest(f"{where} must be a non-empty list of tools", param=where)
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(function, Mapping):
            raise InvalidRequest(f'{at}: a tool is {{"type": "function", "function": {{"name", "description", '
                                 f'"parameters"}}}}', param=at)
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest(f"{at}.function.name must be 1-64 letters, digits, _ or - (got {name!r})",
                                 param=f"{at}.function.name")
        if any(t.name == name for t in out):
            raise InvalidRequest(f"{at}: the tool {name!r} is declared twice", param=f"{at}.function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise InvalidRequest(f"{at}.function.parameters must be a JSON schema (an object)",
                                 param=f"{at}.function.parameters")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise InvalidRequest(f"{at}.function.description must be text", param=f"{at}.function.description")
        out.append(Tool(name, description, dict(parameters)))
    try:
        call_grammar(out)  # a schema the converter cannot take fails here, before anything is fed
    except ValueError as exc:
        raise InvalidRequest(f"{where}: {exc}", param=where) from None
    return tuple(out)


@dataclass(frozen=True)
class ToolUse:
    """The tools a request declares and how it lets the model use them: `choice` "none", "auto"
    or "required", `forced` the one function it must call (OpenAI's named tool_choice)."""
    tools: tuple[Tool, ...]
    choice: str = "auto"
    forced: str | None = None
    parallel: bool = True  # several calls in one reply (OpenAI's parallel_tool_calls)

    @classmethod
    def of(cls, tools: object, tool_choice: object = None, *, parallel: bool = True) -> "ToolUse | None":
        """From a request's `tools`, `tool_choice` and `parallel_tool_calls` (None where it declares
        no tools); InvalidRequest for a bad tool, an unknown choice, or a named function it does not
        declare."""
        if tools is None or tools == []:
            if tool_choice not in (None, "none", "auto"):
                raise InvalidRequest("tool_choice needs tools", param="tool_choice")
            return None
        declared = checked_tools(tools)
        if tool_choice is None or tool_choice in CHOICES:
            return cls(declared, tool_choice or "auto", parallel=parallel)
        name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, Mapping) else None
        if not isinstance(name, str):
            raise InvalidRequest('tool_choice is "none", "auto", "required" or {"type": "function", "function": '
                                 '{"name": ...}}', param="tool_choice")
        if all(t.name != name for t in declared):
            raise InvalidRequest(f"tool_choice names {name!r}, which tools does not declare "
                                 f"({', '.join(t.name for t in declared)})", param="tool_choice")
        return cls(declared, "required", name, parallel)

    def openai_tools(self) -> list[dict]:
        return [t.as_openai() for t in self.tools]

    def sampling(self) -> dict:
        """The sampler's options (`runtime.SamplerOptions` keywords) that hold the reply to them."""
        if self.choice == "none":
            return {}
        grammar = call_grammar([t for t in self.tools if self.forced in (None, t.name)], several=self.parallel)
        return {"grammar": grammar} if self.choice == "required" else {"grammar": grammar,
                                                                       "grammar_triggers": (CALL_OPEN,)}


def call_grammar(tools: Sequence[Tool], *, several: bool = True) -> str:
    """GBNF of one call of `tools` (or one or more: `several`), each `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`
    with arguments its schema accepts; ValueError for a schema the converter cannot take."""
    from .runtime.sampler import json_schema_grammar

    alternatives = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                     "required": ["name", "arguments"]} for t in tools]
    schema = alternatives[0] if len(alternatives) == 1 else {"oneOf": alternatives}
    rules = re.sub(r"^root ::=", "call-object ::=", json_schema_grammar(schema), flags=re.M)
    repeat = ' ("\\n" call)*' if several else ""
    return (f'root ::= call{repeat}\ncall ::= {json.dumps(CALL_OPEN)} "\\n" call-object "\\n" '
            f'{json.dumps(CALL_CLOSE)}\n{rules}')


def parse_reply(text: str, names: Collection[str]) -> tuple[str | None, list[ToolCall]]:
    """A reply's text before its calls (None if none) and the calls it makes of the tools `names`:
    its `<tool_call>` blocks, or the whole reply one call object (bare or in a ```json fence, as
    small models answer when the grammar is not yet holding them). Anything else, a block that does
    not parse or names no declared tool included, leaves the whole reply as text."""
    head, found, _ = text.partition(CALL_OPEN)
    if not found:
        bare = _BARE_CALL.match(text)
        call = _parsed_call(bare[1], names) if bare else None
        return (text, []) if call is None else (None, [call])
    calls = []
    for block in _call_blocks(text):
        call = _parsed_call(block, names)
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    return (head.strip() or None), calls


def _call_blocks(text: str) -> list[str]:
    """What each complete `<tool_call>` block of `text` holds, in order: its JSON value read whole
    where one follows the tag and `</tool_call>` follows it (so that a "</tool_call>" inside one of
    its strings does not end it), else the text up to the next `</tool_call>`."""
    blocks, pos = [], 0
    while (start := text.find(CALL_OPEN, pos)) >= 0:
        body = start + len(CALL_OPEN)
        try:
            _, end = _JSON.raw_decode(text, body + len(text[body:]) - len(text[body:].lstrip()))
            close = end + len(text[end:]) - len(text[end:].lstrip())
            if not text.startswith(CALL_CLOSE, close):
                raise ValueError("no </tool_call> right after the value")
        except (ValueError, RecursionError):  # not (yet) one JSON value then the close tag
            close = text.find(CALL_CLOSE, body)
            if close < 0:
                break
        blocks.append(text[body:close])
        pos = close + len(CALL_CLOSE)
    return blocks


def _parsed_call(block: str, names: Collection[str]) -> ToolCall | None:
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names or "arguments" not in value:
        return None
    arguments = value["arguments"]
    return ToolCall(new_call_id(), value["name"],
                    arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))


class CallStream:
    """A reply's pieces as OpenAI streams them: text as `content` deltas, and each call of the tools
    `names` as `tool_calls` deltas (its id and name with empty arguments, then its arguments) once
    its block is complete; text is held back while it may be the start of a call (a reply that
    opens with "{" or "```" until its end: it may be one bare call). `feed` each piece, then
    `finish`. The calls and text are those `parse_reply` finds in the whole reply."""

    def __init__(self, names: Collection[str]):
        self.names = names
        self.text = ""       # the reply so far
        self.sent = 0        # its characters sent as content
        self.calls: list[ToolCall] = []

    def feed(self, piece: str) -> Iterator[dict]:
        self.text += piece
        head, found, rest = self.text.partition(CALL_OPEN)
        if not found:
            if not self.calls and not _may_be_bare_call(self.text):
                yield from self._content(len(self.text) - _partial_suffix(self.text, CALL_OPEN))
            return
        if not self.calls:
            yield from self._content(len(head.rstrip("\n")))
        for block in _call_blocks(self.text)[len(self.calls):]:
            call = _parsed_call(block, self.names)
            if call is None:
                return  # not a call after all: the rest goes as text at the end, as parse_reply reads it
            yield from self._call(call)

    def finish(self) -> Iterator[dict]:
        """What is held back at the end: a bare call, or the text that was not a call after all."""
        if self.calls:
            return
        _, calls = parse_reply(self.text, self.names)
        for call in calls:
            yield from self._call(call)
        if not calls:
            yield from self._content(len(self.text))

    def _content(self, end: int) -> Iterator[dict]:
        if end > self.sent:
            yield {"content": self.text[self.sent:end]}
            self.sent = end

    def _call(self, call: ToolCall) -> Iterator[dict]:
        index = len(self.calls)
        self.calls.append(call)
        yield {"tool_calls": [{"index": index, "id": call.id, "type": "function",
                               "function": {"name": call.name, "arguments": ""}}]}
        yield {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}


def _may_be_bare_call(text: str) -> bool:
    start = text.lstrip()
    return not start or start.startswith(("{", "```")) or "```".startswith(start)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that starts `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# -- rendering --------------------------------------------------------------------------------
def knows_tools(template: str | None) -> bool:
    """Whether a chat template renders tools and asks for calls in this module's format."""
    return template is not None and "tools" in template and CALL_OPEN in template


def fallback_messages(messages: Sequence[tuple[str, str]], tools: Sequence[Mapping]) -> list[tuple[str, str]]:
    """`messages` for a template that does not know tools: the tools described in the system
    message (one made if there is none), each tool result a user message."""
    listing = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    out = [(role, f"<tool_response>\n{content}\n</tool_response>" if role == "tool" else content)
           for role, content in messages]
    out = [("user", content) if role == "tool" else (role, content) for role, content in out]
    if out and out[0][0] == "system":
        return [("system", out[0][1] + "\n\n" + listing)] + out[1:]
    return [("system", listing)] + out


def tools_renderer(render: Callable[[Sequence[tuple[str, str]], bool], str],
                   render_jinja: Callable[..., str], template: str | None):
    """A renderer (messages, add_assistant, tools) -> text: `render` alone without tools; with
    tools, the template's own (`render_jinja`, which takes `tools=`) where it knows them, else
    `render` over `fallback_messages`."""
    def render_with(messages: Sequence[tuple[str, str]], add_assistant: bool, tools: Sequence[Mapping] | None) -> str:
        if not tools:
            return render(messages, add_assistant)
        if knows_tools(template):
            return render_jinja(messages, add_assistant, tools=list(tools))
        return render(fallback_messages(messages, tools), add_assistant)
    return render_with
