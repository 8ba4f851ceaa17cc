"""Chat with a `StreamSession`: each user turn rendered by the model's chat template, only its new
part fed, the reply generated into the same stream (`ChatTranscript` keeps the last round).
A part of `StreamSession` (its base class), which gives `transcript`, `projector`, `model`, the
feeding methods, `chain_sampler` and `generate`.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from .chat import ChatTranscript, Renderer
from .generation import DEFAULTS, Piece, Sampler
from .multimodal import MediaPart, first_checked
from .tools import ToolUse, tools_renderer

#: a round of messages the model answers: a user message's text, or (role, text) user or tool messages
Round = str | Sequence[tuple[str, str]]


class Conversation:
    """The chat methods of `StreamSession`."""

    def render_chats_with(self, render) -> None:
        """Render the conversation with `render` (messages, open the assistant's turn -> text)
        instead of the model's default renderer; before the first turn."""
        if self.transcript.fed:
            raise ValueError("the conversation has started: its renderer cannot change")
        self.transcript = self.new_transcript(render)

    def new_transcript(self, render: Renderer) -> ChatTranscript:
        """A transcript that renders with `render`, and with the model's template (or the
        documented fallback, `tools`) where the conversation declares tools."""
        return ChatTranscript(render, tools_renderer(render, self.model.render_chat_jinja, self.model.chat_template()))

    def chat_template(self) -> str:
        """The model's chat template; ValueError if it has none."""
        template = self.model.chat_template()
        if template is None:
            raise ValueError(f"{self.model.name} has no chat template; use generate() instead")
        return template

    def chat(self, message: Round, *, media: Iterable[MediaPart] | None = None, system: str | None = None,
             max_tokens: int = DEFAULTS.max_tokens, **sampling) -> str:
        """Add a user turn (with `media`, if any, where the template puts them) and return the
        model's reply, generated into the same stream (the reply's end marker is fed at the next turn).
        `sampling`: the sampler's options as in `generate` (`runtime.SamplerOptions`: temperature,
        top_p, ..., grammar, json_schema), and `tools` / `tool_choice` as in `chat_stream`."""
        return "".join(self.chat_stream(message, media=media, system=system, max_tokens=max_tokens, **sampling))

    def chat_stream(self, message: Round, *, media: Iterable[MediaPart] | None = None, system: str | None = None,
                    max_tokens: int = DEFAULTS.max_tokens, stop: Sequence[str] = (), sampler: Sampler | None = None,
                    logprobs: int | None = None, tools: Sequence[dict] | None = None, tool_choice=None,
                    **sampling) -> Iterator[Piece]:
        """`chat`, the user turn fed now, the reply yielded in `Piece`s as it is sampled (`stop`,
        `sampler`, `logprobs` and the sampling options as in `generate`). `message` may be a round of
        (role, text) messages instead: tool results (`role` "tool") in a row, answered at once.
        `tools` (OpenAI's tool dicts, declared at the conversation's start) and `tool_choice`
        ("none", "auto", "required" or a named function) let the model call them, as `tools.py`
        says: the reply's text holds its calls, `tools.parse_reply` reads them (with a `sampler`,
        the tools are rendered and the sampler alone holds the calls: `ToolUse.sampling()`)."""
        use = ToolUse.of(tools, tool_choice)
        if sampler is not None and sampling:
            raise ValueError(f"sampling options ({', '.join(sampling)}) go without a sampler: the sampler replaces them")
        if sampler is None:  # bad options fail before the turn is fed
            held = use.sampling() if use is not None else {}
            if held and ("grammar" in sampling or "json_schema" in sampling):
                raise ValueError("tool calls are constrained by their own grammar: leave grammar and json_schema out")
            sampler = self.chain_sampler(**sampling, **held)
        self.user_turn(message, media=media, system=system, tools=None if use is None else use.openai_tools())
        return self._reply(self.generate(max_tokens=max_tokens, stop=stop, sampler=sampler, logprobs=logprobs))

    def _reply(self, pieces: Iterator[Piece]) -> Iterator[Piece]:
        reply = ""
        try:
            for piece in pieces:
                reply += piece
                yield piece
        finally:  # a reply cut short (the caller stopped reading) is still part of the conversation
            pieces.close()
            self.transcript.reply(reply)

    def chat_media(self, media: Iterable[MediaPart], *, system: str | None = None) -> int:
        """A user turn that only shows media (an image, a video's frames), with no reply: the next
        `chat` asks about it. Returns the number of image tokens fed."""
        return self.user_turn("", media=media, system=system, add_assistant=False)

    def read_turns(self, turns: Sequence[tuple[str, str, Sequence[MediaPart]]], system: str | None = None,
                   tools: Sequence[dict] | None = None) -> None:
        """Feed a conversation's messages that this stream has not read, without sampling: each
        (role, text, media) user message, or tool results in a row, and the assistant's answer to it
        where one follows (`tools` as in `chat_stream`, declared with the first)."""
        i = 0
        while i < len(turns):
            role, text, media = turns[i]
            end = i + 1
            while role == "tool" and end < len(turns) and turns[end][0] == "tool":
                end += 1
            answered = end < len(turns) and turns[end][0] == "assistant"
            if role not in ("user", "tool"):
                raise ValueError(f"message {i} of the history is the {role}'s: an assistant message answers a user "
                                 "message or tool results")
            round_ = text if role == "user" else [(r, t) for r, t, _ in turns[i:end]]
            self.user_turn(round_, media=list(media) or None, system=system, add_assistant=answered, tools=tools)
            if answered:
                self.assistant_turn(turns[end][1])
            i = end + 1 if answered else end
            system = tools = None

    def assistant_turn(self, text: str) -> int:
        """Feed an assistant message that was not generated here (a conversation's history, replayed)
        as the reply to the last user turn; returns the number of tokens fed."""
        n = self.feed_text(text)
        self.transcript.reply(text)
        return n

    def user_turn(self, message: Round, *, media: Iterable[MediaPart] | None = None, system: str | None = None,
                  add_assistant: bool = True, tools: Sequence[dict] | None = None) -> int:
        """Add a user message, or a round of (role, text) user or tool messages (`system` and
        `tools` too, at the start of a conversation) and feed the new part of the rendered
        conversation, up to the assistant's turn when `add_assistant`; `media` go where the (one)
        user message's media marker renders. Returns the number of image tokens fed."""
        self.chat_template()
        messages = [("user", message)] if isinstance(message, str) else list(message)
        if media is None:
            new = self.transcript.turn(messages, system=system, tools=tools, add_assistant=add_assistant)
            self.feed_prompt(new, special=True, query="\n".join(text for _, text in messages))
            self.transcript.record_fed(new)
            return 0
        if not isinstance(message, str):
            raise ValueError("media go with one user message")
        if self.projector is None:
            raise ValueError("media in a chat turn need a vision projector: pass mmproj=PATH (--mmproj)")
        marker = self.projector.marker
        if marker in message:
            raise ValueError(f"messages cannot contain {marker!r}: it marks where media go")
        parts = first_checked(media)  # a source with no frames fails before any change
        before_turn = self.transcript.state()
        new = self.transcript.turn([("user", marker + ("\n" + message if message else ""))], system=system,
                                   tools=tools, add_assistant=add_assistant)
        head, found, tail = new.rpartition(marker)  # this turn's marker is the last one
        if not found:
            self.transcript.load_state(*before_turn)
            raise ValueError("the chat template dropped the media marker from the message")
        self.feed_prompt(head.replace(marker, ""), special=True, query=message)  # an earlier marker: media already fed
        # once the media start, the stream holds the turn up to its marker, even if a frame fails
        self.transcript.record_fed(head + marker)
        n_image = self.feed_media(parts)
        self.feed_text(tail, special=True)
        self.transcript.record_fed(tail)
        return n_image
