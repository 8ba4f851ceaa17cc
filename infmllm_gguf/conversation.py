"""Chat with a `StreamSession`: each user turn rendered by the model's chat template, only its new
part fed, the reply generated into the same stream (`ChatTranscript` keeps the last round).
A part of `StreamSession` (its base class), which gives `transcript`, `projector`, `model`, the
feeding methods, `chain_sampler` and `generate`.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from .chat import ChatTranscript
from .generation import DEFAULTS, Piece, Sampler
from .multimodal import MediaPart, first_checked


class Conversation:
    """The chat methods of `StreamSession`."""

    def render_chats_with(self, render) -> None:
        """Render the conversation with `render` (messages, open the assistant's turn -> text)
        instead of the model's default renderer; before the first turn."""
        if self.transcript.fed:
            raise ValueError("the conversation has started: its renderer cannot change")
        self.transcript = ChatTranscript(render)

    def chat_template(self) -> str:
        """The model's chat template; ValueError if it has none."""
        template = self.model.chat_template()
        if template is None:
            raise ValueError(f"{self.model.name} has no chat template; use generate() instead")
        return template

    def chat(self, message: str, *, media: Iterable[MediaPart] | None = None, system: str | None = None,
             max_tokens: int = DEFAULTS.max_tokens, **sampling) -> str:
        """Add a user turn (with `media`, if any, where the template puts them) and return the
        model's reply, generated into the same stream (the reply's end marker is fed at the next turn).
        `sampling`: the sampler's options as in `generate` (`runtime.SamplerOptions`: temperature,
        top_p, ..., grammar, json_schema)."""
        return "".join(self.chat_stream(message, media=media, system=system, max_tokens=max_tokens, **sampling))

    def chat_stream(self, message: str, *, media: Iterable[MediaPart] | None = None, system: str | None = None,
                    max_tokens: int = DEFAULTS.max_tokens, stop: Sequence[str] = (), sampler: Sampler | None = None,
                    logprobs: int | None = None, **sampling) -> Iterator[Piece]:
        """`chat`, the user turn fed now, the reply yielded in `Piece`s as it is sampled (`stop`,
        `sampler`, `logprobs` and the sampling options as in `generate`)."""
        if sampler is not None and sampling:
            raise ValueError(f"sampling options ({', '.join(sampling)}) go without a sampler: the sampler replaces them")
        sampler = sampler or self.chain_sampler(**sampling)  # bad options fail before the turn is fed
        self.user_turn(message, media=media, system=system)
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

    def read_turns(self, turns: Sequence[tuple[str, str, Sequence[MediaPart]]], system: str | None = None) -> None:
        """Feed a conversation's messages that this stream has not read, without sampling: each
        (role, text, media) user message, and the assistant's answer to it where one follows."""
        i = 0
        while i < len(turns):
            answered = i + 1 < len(turns) and turns[i + 1][0] == "assistant"
            role, text, media = turns[i]
            if role != "user":
                raise ValueError(f"message {i} of the history is the {role}'s: an assistant message follows a user one")
            self.user_turn(text, media=list(media) or None, system=system, add_assistant=answered)
            if answered:
                self.assistant_turn(turns[i + 1][1])
            i += 2 if answered else 1
            system = None

    def assistant_turn(self, text: str) -> int:
        """Feed an assistant message that was not generated here (a conversation's history, replayed)
        as the reply to the last user turn; returns the number of tokens fed."""
        n = self.feed_text(text)
        self.transcript.reply(text)
        return n

    def user_turn(self, message: str, *, media: Iterable[MediaPart] | None = None, system: str | None = None,
                  add_assistant: bool = True) -> int:
        """Add a user message (`system` too, at the start of a conversation) and feed the new part
        of the rendered conversation, up to the assistant's turn when `add_assistant`; `media` go
        where the message's media marker renders. Returns the number of image tokens fed."""
        self.chat_template()
        if media is None:
            new = self.transcript.user_turn(message, system=system, add_assistant=add_assistant)
            self.feed_prompt(new, special=True, query=message)
            self.transcript.record_fed(new)
            return 0
        if self.projector is None:
            raise ValueError("media in a chat turn need a vision projector: pass mmproj=PATH (--mmproj)")
        marker = self.projector.marker
        if marker in message:
            raise ValueError(f"messages cannot contain {marker!r}: it marks where media go")
        parts = first_checked(media)  # a source with no frames fails before any change
        before_turn = self.transcript.state()
        new = self.transcript.user_turn(marker + ("\n" + message if message else ""), system=system,
                                        add_assistant=add_assistant)
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
