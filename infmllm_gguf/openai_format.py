"""OpenAI's request and response shapes, shared by the server (`server/`) and `Llama` (llama_compat):
the objects a reply is made of (chat.completion, chat.completion.chunk, text_completion), usage
and logprobs; the chain of digests that finds a conversation from the messages a client repeats;
the checks of a message list; the refusal of options that are not implemented; `response_format`.

Errors of a request are `InvalidRequest` (a ValueError, as `Llama` raises them; the server answers
them with OpenAI's 400 error body, `error_body`).
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import InvalidRequest

ROOT = hashlib.sha256(b"infmllm-gguf chat").hexdigest()  # the digest of an empty conversation


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- requests ---------------------------------------------------------------------------------
def chain(parts: Iterable[bytes], start: str = ROOT) -> list[str]:
    """The digest of a conversation after each number of messages (0 .. len(parts)), each message
    given by the bytes that identify it, starting from the digest `start` of what came before: a
    chain, so that a conversation is found from the digest of the messages a request repeats, and
    continued from its own."""
    out = [start]
    for part in parts:
        out.append(hashlib.sha256(out[-1].encode() + b"\1" + part).hexdigest())
    return out


def check_roles(roles: Sequence[str], *, assistant_answers_user: bool = True) -> None:
    """Roles in an order a chat template renders: a system message first if any, a tool message
    after an assistant message or another tool message, the last message the user's or a tool's,
    and (`assistant_answers_user`) each assistant message after a user or tool message."""
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            raise InvalidRequest(f"messages[{i}]: a system message goes first", param=f"messages[{i}]")
        if role == "tool" and (i == 0 or roles[i - 1] not in ("assistant", "tool")):
            raise InvalidRequest(f"messages[{i}]: a tool message answers an assistant's tool calls",
                                 param=f"messages[{i}]")
        if assistant_answers_user and role == "assistant" and (i == 0 or roles[i - 1] not in ("user", "tool")):
            raise InvalidRequest(f"messages[{i}]: an assistant message answers a user message or tool results",
                                 param=f"messages[{i}]")
    if not roles or roles[-1] not in ("user", "tool"):
        raise InvalidRequest("the last message must be the user's or a tool's",
                             param=f"messages[{max(len(roles) - 1, 0)}]")


def refuse_unsupported(options: Mapping[str, object], defaults: Mapping[str, object],
                       says: Callable[[str, object], str]) -> None:
    """InvalidRequest (code "unsupported", the message `says(name, value)`) for the first option of
    `defaults` that `options` sets to anything but its default: refused, never ignored (None, []
    and {} count as not set)."""
    for name, default in defaults.items():
        value = options.get(name, default)
        if value not in (default, None, [], {}):
            raise InvalidRequest(says(name, value), param=name, code="unsupported")


def response_format_sampling(response_format: Mapping[str, Any] | None) -> dict:
    """The sampler's options (`runtime.SamplerOptions` keywords) that make a reply follow OpenAI's
    `response_format`: {} for None or {"type": "text"}; {"type": "json_object"}: any JSON object
    (llama.cpp's JSON grammar), or one that follows its "schema" (llama-cpp-python's extension);
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}: a reply that follows
    "schema" (always strictly: the grammar allows nothing else). InvalidRequest for anything else;
    a schema the converter cannot take fails when the sampler is made (ValueError)."""
    if response_format is None:
        return {}
    if not isinstance(response_format, Mapping):
        raise InvalidRequest("response_format must be an object with a type", param="response_format")
    kind = response_format.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        schema = response_format.get("schema")
        return {"json_schema": _schema(schema if schema is not None else {"type": "object"}, "response_format.schema")}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise InvalidRequest("response_format.json_schema needs a schema", param="response_format.json_schema")
        return {"json_schema": _schema(spec["schema"], "response_format.json_schema.schema")}
    raise InvalidRequest(f"response_format.type must be text, json_object or json_schema (got {kind!r})",
                         param="response_format.type")


def _schema(schema: object, where: str) -> Mapping[str, Any]:
    if not isinstance(schema, Mapping):
        raise InvalidRequest(f"{where} must be a JSON schema (an object)", param=where)
    return schema


# -- responses --------------------------------------------------------------------------------
def head(rid: str, kind: str, model: str, created: float | None = None) -> dict:
    """What every object of a reply starts with; `kind`: "chat.completion", "chat.completion.chunk"
    or "text_completion"."""
    return {"id": rid, "object": kind, "created": int(time.time() if created is None else created), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def message_choice(text: str | None, finish: str | None, logprobs: dict | None,
                   tool_calls: list[dict] | None = None) -> dict:
    """A chat.completion's choice: the whole message (with its `tool_calls`, if it makes any)."""
    message = {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if tool_calls else {})}
    return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}


def delta_choice(text: str | None, finish: str | None, logprobs: dict | None, delta: dict | None = None) -> dict:
    """A chat.completion.chunk's choice: a piece of the message (`text`, or a `delta` of its tool
    calls), or none on the last one."""
    delta = delta if delta is not None else {} if text is None else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def role_chunk(chunk_head: dict, content: str | None = None) -> dict:
    """The first chat.completion.chunk: the message's role (and an empty `content`, where given, as
    OpenAI sends it; llama-cpp-python sends the role alone)."""
    delta = {"role": "assistant"} if content is None else {"role": "assistant", "content": content}
    return {**chunk_head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}


def text_choice(text: str, finish: str | None, logprobs: dict | None) -> dict:
    """A text_completion's choice, whole or streamed."""
    return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}


def logprob_entry(data: bytes, logprob: float) -> dict:
    """Chat's logprobs entry of one token, given its bytes (OpenAI's form: its text, bytes and
    log-probability)."""
    return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}


def completion_logprobs(tokens: list[str], logprobs: list[float], tops: list[dict[str, float]],
                        offset: int = 0) -> dict:
    """Legacy completions' `logprobs`: each token's text, log-probability and alternatives by text,
    and where its text starts (counted from `offset`)."""
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "text_offset": offsets, "token_logprobs": logprobs, "top_logprobs": tops}


def completion_from_chat_logprobs(content: list[dict], offset: int = 0) -> dict:
    """Legacy completions' `logprobs` from chat's entries (`logprob_entry`)."""
    return completion_logprobs([c["token"] for c in content], [c["logprob"] for c in content],
                               [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content], offset)


def chat_from_completion_logprobs(logprobs: dict | None) -> dict | None:
    """Completion logprobs in chat's form, as llama-cpp-python converts them (no bytes)."""
    if logprobs is None:
        return None
    return {"content": [{"token": token, "bytes": None, "logprob": logprob,
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()]}
                        for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                       logprobs["top_logprobs"])],
            "refusal": None}
