"""A chat as the stream sees it: each turn rendered through the model's template, only the new
part fed, the history kept to what rendering the next turn needs."""
from __future__ import annotations

import os
from typing import Callable, Sequence

#: renders (role, content) messages through a chat template; the flag opens the assistant's turn
Renderer = Callable[[Sequence[tuple[str, str]], bool], str]

ROLES = ("system", "user", "assistant")


class ChatTranscript:
    """The end of a conversation (and its system message), enough to render the next turn.

    The stream already holds every earlier turn, so nothing older is kept: a turn costs the same
    at round 100,000 as at round 10, and the saved state stays small. A new user turn is rendered
    after the last user message and its reply (or after the last user message, when it had none),
    and what the stream has not seen of that rendering is fed: chat templates render a turn the
    same whatever came two messages before it.
    """

    def __init__(self, render: Renderer):
        self.render = render
        self.reset()

    def reset(self) -> None:
        self.system: str | None = None
        self.last: list[tuple[str, str]] = []  # the last two rounds at most
        self.fed = ""  # the rendering of system + last, as far as the stream holds it

    def messages(self) -> list[tuple[str, str]]:
        return ([("system", self.system)] if self.system is not None else []) + self.last

    def user_turn(self, content: str, *, system: str | None = None, add_assistant: bool = True) -> str:
        """Add a user message (the system message too, at the start of a conversation); return the
        text of the new turn, up to the assistant's turn when `add_assistant`. Feed it, then say so
        with `record_fed`."""
        if system is not None and self.system is None and not self.last:
            self.system = system
        self._forget_older()
        self.last.append(("user", content))
        full = self.render(self.messages(), add_assistant)
        self.fed = os.path.commonprefix([full, self.fed])
        return full[len(self.fed):]

    def record_fed(self, text: str) -> None:
        """The stream now holds `text` too, the next part of the last user turn's rendering."""
        self.fed += text

    def reply(self, text: str) -> None:
        """The assistant's reply to the last user turn, as generated into the stream."""
        self.last.append(("assistant", text))
        self.fed += text

    def _forget_older(self) -> None:
        """Keep the last user message and its reply (or that message alone, when it had none) and
        render them again as the stream holds them: the reply as generated, without the end-of-turn
        text that the next turn's rendering brings."""
        keep = 2 if self.last and self.last[-1][0] == "assistant" else 1
        if len(self.last) <= keep:
            return
        self.last = self.last[-keep:]
        if keep == 2:
            self.fed = self.render(self.messages()[:-1], True) + self.last[-1][1]
        else:
            self.fed = self.render(self.messages(), False)

    # -- state ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        return {"system": self.system, "last": list(self.last), "fed": self.fed}, {}

    def check_state(self, state: dict, arrays: dict | None = None) -> None:
        if not isinstance(state, dict) or not {"system", "last", "fed"} <= set(state) or \
                not isinstance(state["fed"], str) or len(state["last"]) > 4 or \
                not all(len(m) == 2 and m[0] in ROLES and isinstance(m[1], str) for m in state["last"]):
            raise ValueError("the saved chat transcript is not one this version writes")

    def load_state(self, state: dict, arrays: dict | None = None) -> None:
        self.system = state["system"]
        self.last = [tuple(m) for m in state["last"]]
        self.fed = state["fed"]
