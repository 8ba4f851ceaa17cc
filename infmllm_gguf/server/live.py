"""The live set: the conversations whose session holds a llama.cpp context, at most `max_sessions`;
the least recently used one that no request holds is closed (its snapshot written first) to make
room for another."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..policies import Policy
from ..runtime import Model
from ..session import SessionConfig, StreamSession


@dataclass
class Conversation:
    id: str
    digest: str                  # of the messages the stream holds, up to the last reply (`api.turn_digests`)
    n_messages: int = 0
    session: StreamSession | None = None  # None while on disk
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    last_used: float = field(default_factory=time.monotonic)
    snapshot_messages: int = 0   # the messages its snapshot on disk holds (the log holds the rest)
    published: dict = field(default_factory=dict)  # what readers see: the state after the last request


@dataclass
class SessionSettings:
    """What each conversation's session is made with: its `SessionConfig`, the vision projector,
    and the stream tokens kept for the web page's view."""
    config: SessionConfig
    mmproj: str | os.PathLike | None = None
    view_tokens: int = 4096

    @property
    def policy(self) -> Policy:
        return self.config.policy

    def new_session(self, model: Model, *, view_tokens: int | None = None) -> StreamSession:
        return StreamSession.from_config(model, self.config, mmproj=self.mmproj,
                                         view_tokens=self.view_tokens if view_tokens is None else view_tokens)


class Storage(Protocol):
    """Where a conversation that leaves the live set goes, and where it comes back from (`Journal`)."""

    def save(self, conv: Conversation) -> None: ...

    def restore(self, conv: Conversation) -> StreamSession: ...


class LiveSet:
    def __init__(self, max_sessions: int, storage: Storage):
        self.max_sessions, self.storage = max_sessions, storage
        self._lock = threading.Lock()
        self._live: dict[str, Conversation] = {}

    def conversations(self) -> list[Conversation]:
        """The live conversations now."""
        with self._lock:
            return list(self._live.values())

    def session(self, conv: Conversation) -> StreamSession:
        """Under the conversation's lock and a slot: its session, made live (restored, or new); the
        least recently used unlocked live conversation is closed to make room (saved first unless
        its snapshot is current)."""
        conv.last_used = time.monotonic()
        if conv.session is not None:
            return conv.session
        live = self.conversations()
        while len(live) >= self.max_sessions:
            idle = sorted((c for c in live if not c.lock.locked()), key=lambda c: c.last_used)
            victim = next((c for c in idle if c.lock.acquire(blocking=False)), None)
            if victim is None:  # cannot happen: a slot each, and parallel <= max_sessions
                raise RuntimeError("no live conversation can be saved to make room")
            try:
                if victim.session is not None:
                    self.storage.save(victim)
                    self.close(victim)
            finally:
                victim.lock.release()
            live.remove(victim)
        conv.session = self.storage.restore(conv)
        with self._lock:
            self._live[conv.id] = conv
        return conv.session

    def close(self, conv: Conversation) -> None:
        """Under the conversation's lock: close its session (unsaved: `Storage.save` first to keep it)."""
        with self._lock:
            self._live.pop(conv.id, None)
        if conv.session is not None:
            conv.session.close()
            conv.session = None
