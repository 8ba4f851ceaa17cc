"""The OpenAI-compatible request bodies, their checks, and the error body OpenAI clients read.

Everything a request says is checked here, before any conversation is touched: message roles and
order, sampling values (the sampler chain's options, a `response_format`'s schema converted and
parsed against the model's vocabulary, `logit_bias`'s token ids), and every image (a base64
`data:` URL that must decode as an image; the server never reads a path or fetches a URL on a
client's behalf).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..generation import DEFAULTS
from ..multimodal import load_image
from ..openai_format import (ROOT, InvalidRequest, chain, check_roles, error_body, refuse_unsupported,
                             response_format_sampling)
from ..runtime import ChainSampler, Model, SamplerOptions, json_schema_grammar
from ..tools import ToolUse, message_text
from .limits import DEFAULT_MAX_TOKENS

#: parameters of OpenAI's API that this server does not implement: refused when set, never ignored
UNSUPPORTED = {"functions": None, "function_call": None, "audio": None,
               "modalities": None, "prediction": None, "best_of": 1, "echo": False, "suffix": None}
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?P<params>(;[\w.+-]+=?[\w.+-]*)*),(?P<data>.*)$", re.S)


class ApiError(Exception):
    """An error answered with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)

    @classmethod
    def invalid(cls, exc: InvalidRequest) -> "ApiError":
        """A request the shared checks (`openai_format`) refused: 400."""
        return cls(400, exc.message, param=exc.param, code=exc.code)


def _utf8(text):
    """Text the model can read, or ValueError: JSON carries lone surrogates ("\\ud800"), which UTF-8,
    so the tokenizer, cannot (a list: each of its texts, a content part's included)."""
    for t in text if isinstance(text, list) else [text]:
        t = getattr(t, "text", t)
        try:
            if isinstance(t, str):
                t.encode()
        except UnicodeEncodeError as exc:
            raise ValueError(f"the text holds a lone surrogate ({t[exc.start]!r} at {exc.start}): not "
                             "valid Unicode") from None
    return text


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[ContentPart] | None, AfterValidator(_utf8)] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant message's calls, as a reply "
                                                    "gave them")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description=(
        "the JSON schema the reply follows, made a grammar by llama-cpp-python's converter: types, properties, "
        "required, additionalProperties, enum, const, anyOf/oneOf, allOf, items, prefixItems, minItems, "
        "maxItems, minLength, maxLength, pattern, some formats and $ref within the schema; what it does not "
        "convert (minimum, maximum, multipleOf, uniqueItems, ...) is not enforced"))
    strict: bool | None = Field(None, description="always strict here: the grammar allows nothing else")


class ResponseFormat(BaseModel):
    """How the reply is made (`openai_format.response_format_sampling`): free text; any JSON object
    (json_object), or one that follows its `schema` (llama-cpp-python's extension); a reply that
    follows `json_schema.schema`."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="json_object's schema (as "
                                           "llama-cpp-python takes it); without one, any JSON object")

    def sampling(self) -> dict:
        """The sampler's options that make a reply follow it; ApiError (400) for a format that is not one."""
        try:
            return response_format_sampling(self.model_dump(by_alias=True, exclude_none=True))
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None


def chain_seed(seed: int | None) -> int | None:
    """The sampler chain's seed (0 .. `SamplerOptions.MAX_SEED`) for OpenAI's `seed`, which takes any
    integer: None stays None (the conversation's generator draws one); a negative seed is a random
    one, as llama-cpp-python's -1; any other is taken modulo MAX_SEED + 1 (the same seed, the same
    draws)."""
    if seed is None:
        return None
    if seed < 0:
        return secrets.randbelow(SamplerOptions.MAX_SEED + 1)
    return seed % (SamplerOptions.MAX_SEED + 1)


class RequestBody(BaseModel):
    """What both routes take: the model, the reply's length, sampling, stop strings, streaming.

    Sampling is llama.cpp's sampler chain (`runtime.SamplerOptions`). `frequency_penalty`,
    `presence_penalty` and llama.cpp's `repeat_penalty` count the tokens of the reply so far, as
    OpenAI counts "the text so far" (the chain's window is the reply's `max_tokens`). `logit_bias` is
    added to the token's logit, as OpenAI describes it, -100 included: not -inf, so that a grammar
    that allows only banned tokens (the end of generation a complete JSON reply needs) still has one
    to pick; elsewhere -100 makes a token e^-100 times as likely as it was (e^-50 at temperature 2),
    a ban in practice."""
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, metadata, store) do not matter here

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(DEFAULTS.temperature, ge=0.0, le=2.0)
    top_p: float = Field(DEFAULTS.top_p, gt=0.0, le=1.0)
    top_k: int = Field(SamplerOptions.top_k, ge=0, le=2 ** 31 - 1, description="llama.cpp's: the k likeliest "
                       "tokens (0: all)")
    min_p: float = Field(SamplerOptions.min_p, ge=0.0, le=1.0, description="llama.cpp's: tokens at least p "
                         "times as likely as the likeliest (0: all)")
    repeat_penalty: float = Field(SamplerOptions.repeat_penalty, gt=0.0, allow_inf_nan=False,
                                  description="llama.cpp's: the logit of a token seen in the reply divided by "
                                  "it (multiplied, if negative; 1: off)")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="lowers a token's logit by this "
                                            "times its count in the reply so far")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="lowers the logit of a token "
                                           "that the reply holds so far by this")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="token id (of this model's vocabulary) -> a number added to its logit")
    response_format: ResponseFormat | None = None
    stop: Annotated[str | list[str] | None, AfterValidator(_utf8)] = None
    seed: int | None = Field(None, description="any integer: a negative one is random, one beyond 2**32 - 2 is "
                             "taken modulo 2**32 - 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    def reply_tokens(self, cap: int) -> int:
        """The most tokens the reply may have: as asked (default `DEFAULT_MAX_TOKENS`), at most `cap`."""
        asked = getattr(self, "max_completion_tokens", None) or self.max_tokens
        if asked is not None and asked > cap:
            param = "max_completion_tokens" if getattr(self, "max_completion_tokens", None) else "max_tokens"
            raise ApiError(400, f"{param} is {asked}; this server generates at most {cap} tokens per reply "
                                "(serve --max-tokens)", param=param, code="max_tokens_too_large")
        return asked or min(DEFAULT_MAX_TOKENS, cap)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return stops

    def sampling(self, model: Model, max_tokens: int) -> dict:
        """The sampler chain's options (`runtime.SamplerOptions` keywords) the request asks, checked
        against `model`: a JSON schema converted to a grammar (once, here) that llama.cpp parses over
        its vocabulary, token ids of its vocabulary; ApiError (400) for a bad one."""
        options = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                       repeat_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty or 0.0,
                       presence_penalty=self.presence_penalty or 0.0, penalty_last_n=max_tokens,
                       logit_bias=self.token_biases(model.n_vocab), seed=chain_seed(self.seed))
        if self.response_format is not None:
            options.update(self.response_format.sampling())
        try:
            checked = SamplerOptions(**{k: v for k, v in options.items() if k != "json_schema"})
        except ValueError as exc:  # a value the body's bounds let through
            raise ApiError(400, str(exc), code="invalid_value") from None
        try:
            if "json_schema" in options:
                options["grammar"] = json_schema_grammar(options.pop("json_schema"))
            if options.get("grammar") is not None:
                ChainSampler(model, dataclasses.replace(checked, grammar=options["grammar"])).close()  # parsed
        except ValueError as exc:
            raise ApiError(400, f"response_format: {exc}", param="response_format", code="invalid_schema") from None
        return options

    def token_biases(self, n_vocab: int) -> dict[int, float]:
        """`logit_bias` by token id; ApiError (400) for a key that is not a token id of the vocabulary."""
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= len(str(n_vocab)) and int(key) < n_vocab):
                raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model (its vocabulary's ids "
                                    f"are 0 to {n_vocab - 1})", param="logit_bias", code="invalid_value")
            biases[int(key)] = bias
        return biases

    def refuse_unsupported(self) -> None:
        """400 for an option of OpenAI's that this server does not implement, when set."""
        try:
            refuse_unsupported(self.model_extra or {}, UNSUPPORTED, lambda name, _: f"{name} is not supported by "
                                                                                   "this server")
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None


class ChatRequest(RequestBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(None, description="functions the model may call ({type: function, "
                                               "function: {name, description, parameters}}): declared with a "
                                               "conversation's first request, rendered before its messages")
    tool_choice: str | dict[str, Any] | None = Field(None, description="none, auto (the default with tools), "
                                                     "required, or {type: function, function: {name}}")
    parallel_tool_calls: bool = True

    def tool_use(self) -> ToolUse | None:
        """The tools it declares and how the model may call them; ApiError (400) for bad ones."""
        try:
            use = ToolUse.of(self.tools, self.tool_choice, parallel=self.parallel_tool_calls)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from None
        if use is not None and self.response_format is not None and self.response_format.type != "text":
            raise ApiError(400, "tools and a response_format each constrain the reply: give one of them",
                           param="response_format")
        return use


class CompletionRequest(RequestBody):
    prompt: Annotated[str, AfterValidator(_utf8)]
    logprobs: int | None = Field(None, ge=0, le=5)


@dataclass(frozen=True)
class Turn:
    """One message, checked: its role, its text, and its images (each file's bytes, checked to
    decode), in order."""
    role: str
    text: str
    images: tuple[bytes, ...] = ()
    image_digests: tuple[str, ...] = ()
    declares: str = ""  # the first message's: the tools the conversation declares (their JSON), rendered before it

    def digest_part(self) -> bytes:
        """What identifies the message in a conversation's digest (whitespace at the ends aside:
        clients trim what they send back)."""
        return b"\0".join([self.role.encode(), self.text.strip().encode(), *(d.encode() for d in self.image_digests),
                           *([self.declares.encode()] if self.declares else [])])


def decode_image(url: str, where: str) -> tuple[bytes, str]:
    """The image file of a base64 `data:` URL, checked to decode, and its SHA-256; ApiError (400)
    for anything else."""
    match = DATA_URL.match(url)
    if match is None:
        raise ApiError(400, f"{where}: only base64 data: URLs are accepted (the server never reads a path or "
                            "fetches a URL)", param=where, code="invalid_image_url")
    if ";base64" not in match["params"]:
        raise ApiError(400, f"{where}: the data: URL is not base64", param=where, code="invalid_image_url")
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{where}: undecodable base64 ({exc})", param=where, code="invalid_image") from None
    try:
        load_image(data)
    except ValueError as exc:
        raise ApiError(400, f"{where}: {exc}", param=where, code="invalid_image") from None
    return data, hashlib.sha256(data).hexdigest()


def checked_turns(messages: list[Message], *, images_allowed: bool) -> list[Turn]:
    """The request's messages as turns: images decoded, an assistant's tool calls as the model
    writes them, roles in an order a chat template renders (system first, an assistant message
    after a user message or tool results, tool results after an assistant message, the last one
    from the user or a tool)."""
    turns = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        where = f"messages[{i}]"
        if m.tool_calls or role == "tool":
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                raise ApiError(400, f"{where}: only user messages carry images", param=where)
            texts = m.content if not isinstance(m.content, list) else "\n".join(p.text or "" for p in m.content)
            try:
                turns.append(Turn(*message_text({"role": role, "content": texts, "tool_calls": m.tool_calls}, where)))
            except InvalidRequest as exc:
                raise ApiError.invalid(exc) from None
            continue
        if isinstance(m.content, str) or m.content is None:
            if m.content is None:
                raise ApiError(400, f"{where}: content is missing", param=where)
            turns.append(Turn(role, m.content))
            continue
        texts, images, digests = [], [], []
        for j, part in enumerate(m.content):
            if part.type == "text":
                texts.append(part.text or "")
                continue
            if role != "user":
                raise ApiError(400, f"{where}: only user messages carry images", param=where)
            if not images_allowed:
                raise ApiError(400, f"{where}: this server has no vision projector: start it with --mmproj to "
                                    "send images", param=f"{where}.content[{j}]", code="images_unsupported")
            if part.image_url is None:
                raise ApiError(400, f"{where}.content[{j}]: image_url is missing", param=where)
            image, digest = decode_image(part.image_url.url, f"{where}.content[{j}]")
            images.append(image)
            digests.append(digest)
        turns.append(Turn(role, "\n".join(texts), tuple(images), tuple(digests)))
    try:
        check_roles([t.role for t in turns])
    except InvalidRequest as exc:
        raise ApiError.invalid(exc) from None
    return turns


def turn_digests(turns: list[Turn], start: str = ROOT) -> list[str]:
    """The chain of digests (`openai_format.chain`) of the conversation after each number of
    turns (0 .. len(turns)), from the digest `start` of what came before."""
    return chain([t.digest_part() for t in turns], start)


def error_from_validation(errors: list[dict[str, Any]]) -> ApiError:
    """A body that does not validate: 400, as OpenAI answers it (FastAPI's default is 422)."""
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None,
                    code="invalid_value")
