"""What a request asks, one class per route: which conversation it continues, what it feeds the
stream, how its reply is sampled, what the journal logs of it, and the shape of its reply
(`openai_format`). `RequestRunner` runs them; every request's body is checked when its job is made,
before anything is admitted (its sampling options against the model)."""
from __future__ import annotations

import dataclasses
import json
from typing import ClassVar, Iterator

from ..generation import Piece
from ..openai_format import (completion_from_chat_logprobs, delta_choice, message_choice, role_chunk,
                             text_choice)
from ..runtime import ChainSampler, Model, SamplerOptions
from ..session import StreamSession
from ..tools import CallStream, message_text, parse_reply
from .api import ApiError, ChatRequest, CompletionRequest, RequestBody, Turn, checked_turns, turn_digests
from .conversations import Conversation, ConversationStore
from .journal import read_history, turn_to_json
from .limits import Limits


class Job:
    """A request checked: its body, the reply's length, its sampler chain's options (`sampling`), the
    conversation it names (`session_id`)."""
    object: ClassVar[str]       # the reply's object
    chunk_object: ClassVar[str]  # a streamed piece's
    id_prefix: ClassVar[str]

    def __init__(self, body: RequestBody, limits: Limits, session_id: str | None, model: Model):
        body.refuse_unsupported()
        self.stops = body.stops()
        self.max_tokens = body.reply_tokens(limits.max_tokens)
        self.sampling = body.sampling(model, self.max_tokens)
        self.body, self.session_id = body, session_id
        self.digests: list[str] = turn_digests([])

    @property
    def kept(self) -> bool:
        """Whether a later request can continue its conversation (its requests are logged)."""
        return True

    @property
    def top_logprobs(self) -> int | None:
        """The alternatives each token's logprobs entry lists (None: no logprobs)."""
        raise NotImplementedError

    def conversation(self, store: ConversationStore) -> Conversation:
        """The conversation it continues (or a new one)."""
        return store.find(self.digests, self.session_id)

    def held(self, store: ConversationStore, conv: Conversation) -> int | None:
        """Under the conversation's lock: how many of its messages the conversation holds (None: it
        moved on meanwhile, find it again)."""
        return 0

    def new_texts(self, held: int) -> list[str]:
        """What it feeds beyond what the conversation holds (`--max-prompt-tokens` counts these)."""
        raise NotImplementedError

    def start(self, session: StreamSession, held: int, **options) -> Iterator[Piece]:
        """Feed it and start the reply: its pieces."""
        raise NotImplementedError

    def fed(self, held: int, text: str) -> tuple[list[Turn], dict]:
        """The messages the stream holds after the reply `text`, beyond the conversation's, and the
        journal's entry of the request (as `journal.replay` reads it)."""
        raise NotImplementedError

    # -- the reply's shape ------------------------------------------------------------------
    def choice(self, text: str | None, finish: str | None, logprobs: list[dict] | None, *, stream: bool,
               offset: int = 0) -> dict:
        """The reply's choice, whole or a streamed piece of it (`text` None: the last piece);
        `logprobs`: chat's entries of its tokens (`openai_format.logprob_entry`), `offset`: the
        characters of the reply before it."""
        raise NotImplementedError

    def stream_choices(self, text: str | None, logprobs: list[dict] | None, offset: int = 0) -> list[dict]:
        """The streamed choices of a piece of the reply (`text`; None: what is held back at its end)."""
        return [] if text is None else [self.choice(text, None, logprobs, stream=True, offset=offset)]

    def first_chunk(self, head: dict) -> dict | None:
        """What a streamed reply starts with, before its first piece."""
        return None


class ChatJob(Job):
    """A chat completion; with `tools`, the reply's calls come as `tool_calls` (streamed as
    OpenAI's deltas, without logprobs) and the tools are rendered before the conversation."""
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(self, body: ChatRequest, limits: Limits, session_id: str | None, model: Model, *,
                 images_allowed: bool):
        super().__init__(body, limits, session_id, model)
        self.tools = body.tool_use()
        self.declared = None if self.tools is None else self.tools.openai_tools()
        self.turns = checked_turns(body.messages, images_allowed=images_allowed)
        if self.tools is not None:
            self.sampling.update(self.tools.sampling())
            try:  # the call grammar parsed over the vocabulary: a function's schema it cannot take is a 400
                ChainSampler(model, SamplerOptions(**self.sampling)).close()
            except ValueError as exc:
                raise ApiError(400, f"tools: {exc}", param="tools", code="invalid_schema") from None
            self.turns[0] = dataclasses.replace(self.turns[0], declares=json.dumps(self.declared, sort_keys=True))
        self.names = [] if self.tools is None or self.tools.choice == "none" else [t.name for t in self.tools.tools]
        self.calls = CallStream(self.names)
        self.digests = turn_digests(self.turns)

    @property
    def top_logprobs(self) -> int | None:
        return (self.body.top_logprobs or 0) if self.body.logprobs else None

    def held(self, store: ConversationStore, conv: Conversation) -> int | None:
        held = store.held(conv, self.digests, self.session_id)
        if held == 0 and conv.n_messages and self.turns[0].role == "system":
            raise ApiError(400, "this conversation has begun: send its whole history, or only its new messages "
                                "without a system message", param="messages")
        return held

    def new_texts(self, held: int) -> list[str]:
        return [t.text for t in self.turns[held:]]

    def start(self, session: StreamSession, held: int, **options) -> Iterator[Piece]:
        new = self.turns[held:]
        system = new[0].text if new[0].role == "system" else None
        rest = new[1:] if system is not None else new
        n_last = 1  # the reply answers the last message, or the tool results at the end in a row
        while rest[-1].role == "tool" and n_last < len(rest) and rest[-n_last - 1].role == "tool":
            n_last += 1
        history, last = rest[:-n_last], rest[-n_last:]
        read_history(session, history, system, self.declared)
        message = last[0].text if last[0].role == "user" else [(t.role, t.text) for t in last]
        return session.chat_stream(message, media=list(last[0].images) or None, system=None if history else system,
                                   tools=self.declared, **options)

    def fed(self, held: int, text: str) -> tuple[list[Turn], dict]:
        new = self.turns[held:]
        entry = {"kind": "chat", "turns": [turn_to_json(t) for t in new], "reply": text,
                 **({"tools": self.declared} if self.declared else {})}
        content, calls = self.reply_parts(text)
        # the reply as a client sends it back: its calls as message_text writes them
        message = message_text({"role": "assistant", "content": content,
                                "tool_calls": [c.as_openai() for c in calls]}, "reply")[1] if calls else text
        return new + [Turn("assistant", message)], entry

    def reply_parts(self, text: str) -> tuple[str | None, list]:
        return parse_reply(text, self.names) if self.names else (text, [])

    def choice(self, text: str | None, finish: str | None, logprobs: list[dict] | None, *, stream: bool,
               offset: int = 0) -> dict:
        shaped = None if logprobs is None else {"content": logprobs}
        if stream:
            return delta_choice(text, "tool_calls" if finish and self.calls.calls else finish, shaped)
        content, calls = self.reply_parts(text)
        return message_choice(content, "tool_calls" if calls else finish, shaped, [c.as_openai() for c in calls])

    def stream_choices(self, text: str | None, logprobs: list[dict] | None, offset: int = 0) -> list[dict]:
        if not self.names:
            return super().stream_choices(text, logprobs, offset)
        deltas = self.calls.finish() if text is None else self.calls.feed(text)
        return [delta_choice(None, None, None, delta) for delta in deltas]

    def first_chunk(self, head: dict) -> dict | None:
        return role_chunk(head, content="")


class CompletionJob(Job):
    """A text completion: a conversation of its own unless a session id names one to continue."""
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    def __init__(self, body: CompletionRequest, limits: Limits, session_id: str | None, model: Model):
        super().__init__(body, limits, session_id, model)
        if not body.prompt:
            raise ApiError(400, "prompt is empty", param="prompt")

    @property
    def kept(self) -> bool:
        return self.session_id is not None

    @property
    def top_logprobs(self) -> int | None:
        return self.body.logprobs

    def conversation(self, store: ConversationStore) -> Conversation:
        return store.find(self.digests, self.session_id) if self.kept else store.new()

    def new_texts(self, held: int) -> list[str]:
        return [self.body.prompt]

    def start(self, session: StreamSession, held: int, **options) -> Iterator[Piece]:
        if session.stats.tokens_seen == 0 and not session.tokenize(self.body.prompt):
            raise ApiError(400, "the prompt holds no token this model reads (its tokenizer drops every character "
                                "of it): nothing to continue", param="prompt")
        return session.generate(self.body.prompt, **options)

    def fed(self, held: int, text: str) -> tuple[list[Turn], dict]:
        return [Turn("user", self.body.prompt + text)], {"kind": "completion", "prompt": self.body.prompt,
                                                         "reply": text}

    def choice(self, text: str | None, finish: str | None, logprobs: list[dict] | None, *, stream: bool,
               offset: int = 0) -> dict:
        return text_choice(text or "", finish, None if logprobs is None else
                           completion_from_chat_logprobs(logprobs, offset))
