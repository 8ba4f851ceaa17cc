"""The OpenAI-compatible request bodies, their checks, and the error body OpenAI clients read.

Everything a request says is checked here, before any conversation is touched: message roles and
order, sampling values, and every image (a base64 `data:` URL that must decode as an image; the
server never reads a path or fetches a URL on a client's behalf).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..generation import DEFAULTS
from ..multimodal import load_image
from ..openai_format import ROOT, InvalidRequest, chain, check_roles, error_body, refuse_unsupported
from .limits import DEFAULT_MAX_TOKENS

#: parameters of OpenAI's API that this server does not implement: refused when set, never ignored
UNSUPPORTED = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "tools": None,
               "tool_choice": None, "functions": None, "function_call": None, "response_format": None,
               "audio": None, "modalities": None, "prediction": None, "best_of": 1, "echo": False, "suffix": None}
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
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[ContentPart] | None, AfterValidator(_utf8)] = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class RequestBody(BaseModel):
    """What both routes take: the model, the reply's length, sampling, stop strings, streaming."""
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, metadata, store) do not matter here

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(DEFAULTS.temperature, ge=0.0, le=2.0)
    top_p: float = Field(DEFAULTS.top_p, gt=0.0, le=1.0)
    stop: Annotated[str | list[str] | None, AfterValidator(_utf8)] = None
    seed: int | None = None
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

    def digest_part(self) -> bytes:
        """What identifies the message in a conversation's digest (whitespace at the ends aside:
        clients trim what they send back)."""
        return b"\0".join([self.role.encode(), self.text.strip().encode(), *(d.encode() for d in self.image_digests)])


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
    """The request's messages as turns: images decoded, roles in an order a chat template renders
    (system first, an assistant message after a user message, the last one from the user)."""
    turns = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        where = f"messages[{i}]"
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
