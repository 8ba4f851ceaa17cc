"""A chat as the stream sees it: each turn rendered through the model's template, only the new
part fed, the history kept to what rendering the next turn needs."""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

#: renders (role, content) messages through a chat template; the flag opens the assistant's turn
Renderer = Callable[[Sequence[tuple[str, str]], bool], str]
#: the same with the tools the conversation declares (OpenAI's tool dicts; see `tools.tools_renderer`)
ToolsRenderer = Callable[[Sequence[tuple[str, str]], bool, Sequence[Mapping]], str]

ROLES = ("system", "user", "assistant", "tool")
MAX_KEPT = 64  # messages a saved transcript may keep: a round of tool results, and its reply


class ChatTranscript:
    """The end of a conversation (and its system message), enough to render the next turn.

    The stream already holds every earlier turn, so nothing older is kept: a turn costs the same
    at round 100,000 as at round 10, and the saved state stays small. A new user turn is rendered
    after the last user message and its reply (or after the last user message, when it had none),
    and what the stream has not seen of that rendering is fed: chat templates render a turn the
    same whatever came two messages before it. A round of tool results (`role: tool` messages in a
    row) is rendered as one turn, as templates group them.

    The tools a conversation declares (OpenAI's tool dicts) are fixed at its start, as its system
    message is: templates render them there.
    """

    def __init__(self, render: Renderer, render_tools: ToolsRenderer | None = None):
        self.render, self.render_tools = render, render_tools
        self.reset()

    def reset(self) -> None:
        self.system: str | None = None
        self.tools: list[dict] | None = None
        self.last: list[tuple[str, str]] = []  # the last round and its reply at most
        self.fed = ""  # the rendering of system + last, as far as the stream holds it

    def messages(self) -> list[tuple[str, str]]:
        return ([("system", self.system)] if self.system is not None else []) + self.last

    def user_turn(self, content: str, *, system: str | None = None, add_assistant: bool = True) -> str:
        """Add a user message; see `turn`."""
        return self.turn([("user", content)], system=system, add_assistant=add_assistant)

    def turn(self, messages: Sequence[tuple[str, str]], *, system: str | None = None,
             tools: Sequence[Mapping] | None = None, add_assistant: bool = True) -> str:
        """Add a round of user or tool messages (the system message and the tools too, at the start
        of a conversation); return the text of the new turn, up to the assistant's turn when
        `add_assistant`. Feed it, then say so with `record_fed`."""
        if any(role not in ("user", "tool") for role, _ in messages) or not messages:
            raise ValueError("a turn is one or more user or tool messages")
        started = self.system is not None or bool(self.last)
        if tools and self.render_tools is None:
            raise ValueError("this chat renderer knows no tools")
        if tools and started and self.tools != list(tools):
            raise ValueError("tools are declared at the start of a conversation: these differ from its own")
        if not started:
            self.system = system
            self.tools = list(tools) if tools else None
        self._forget_older()
        self.last.extend(messages)
        full = self._render(self.messages(), add_assistant)
        self.fed = os.path.commonprefix([full, self.fed])
        return full[len(self.fed):]

    def _render(self, messages: Sequence[tuple[str, str]], add_assistant: bool) -> str:
        if self.tools:
            return self.render_tools(messages, add_assistant, self.tools)
        return self.render(messages, add_assistant)

    def record_fed(self, text: str) -> None:
        """The stream now holds `text` too, the next part of the last user turn's rendering."""
        self.fed += text

    def reply(self, text: str) -> None:
        """The assistant's reply to the last user turn, as generated into the stream."""
        self.last.append(("assistant", text))
        self.fed += text

    def _forget_older(self) -> None:
        """Keep the last round and its reply (or the round alone, when it had none) and render them
        again as the stream holds them: the reply as generated, without the end-of-turn text that
        the next turn's rendering brings. A round is the last user message, or the tool results in
        a row."""
        replied = bool(self.last) and self.last[-1][0] == "assistant"
        start = len(self.last) - (2 if replied else 1)
        while start > 0 and self.last[start][0] == "tool" and self.last[start - 1][0] == "tool":
            start -= 1
        if start <= 0:
            return
        self.last = self.last[start:]
        if replied:
            self.fed = self._render(self.messages()[:-1], True) + self.last[-1][1]
        else:
            self.fed = self._render(self.messages(), False)

    # -- state ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        return {"system": self.system, "tools": self.tools, "last": list(self.last), "fed": self.fed}, {}

    def check_state(self, state: dict, arrays: dict | None = None) -> None:
        if not isinstance(state, dict) or not {"system", "last", "fed"} <= set(state) or \
                not isinstance(state["fed"], str) or len(state["last"]) > MAX_KEPT or \
                not all(len(m) == 2 and m[0] in ROLES and isinstance(m[1], str) for m in state["last"]) or \
                not isinstance(state.get("tools") or [], list):
            raise ValueError("the saved chat transcript is not one this version writes")
        if state.get("tools") and self.render_tools is None:
            raise ValueError("the saved conversation declares tools, which this renderer does not know")

    def load_state(self, state: dict, arrays: dict | None = None) -> None:
        self.system = state["system"]
        self.tools = state.get("tools")  # absent from files saved before tools
        self.last = [tuple(m) for m in state["last"]]
        self.fed = state["fed"]
