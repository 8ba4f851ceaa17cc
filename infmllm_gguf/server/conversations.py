"""The server's conversations: each a `StreamSession` over one shared model, found again from the
messages a client repeats, at most `max_sessions` of them holding a llama.cpp context, the rest
saved to disk and restored exactly when their next request comes.

Locking: a request first takes a slot (at most `parallel` requests work at once; beyond the
`queue` waiting ones the server answers 503), then its conversation's lock (two requests to one
conversation run one after the other). A conversation's session is made live only under both, so
a live session that is not locked is free to be saved and closed.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..memory import MemoryConfig
from ..policies import Policy
from ..probes import rss_mib
from ..runtime import Model
from ..session import StreamSession
from .api import ROOT, ApiError

SESSION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(n: int = 2) -> None:
    """Let glibc keep at most `n` heaps: it gives every thread that allocates one of its own, and
    with requests served from many threads the freed pages of save buffers stayed in each (43 MiB
    over the concurrency test). A no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, n)
    except (OSError, AttributeError):
        pass


@dataclass
class Conversation:
    id: str
    digest: str                  # of the messages the stream holds, up to the last reply (`api.chain`)
    n_messages: int = 0
    session: StreamSession | None = None  # None while saved on disk
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class SessionSettings:
    """What each conversation's session is made with."""
    policy: Policy
    chunk: int = 256
    n_threads: int | None = None
    flash_attn: bool | None = None
    mmproj: str | os.PathLike | None = None
    history: int = 4096  # stream tokens kept for the web page's view
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    memory: MemoryConfig | None = None

    def new_session(self, model: Model, *, history: int | None = None) -> StreamSession:
        return StreamSession(model, self.policy, chunk=self.chunk, n_threads=self.n_threads, flash_attn=self.flash_attn,
                             mmproj=self.mmproj, history=self.history if history is None else history,
                             cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v, memory=self.memory)


class Busy(Exception):
    """Every slot and the queue are taken."""


class ConversationStore:
    def __init__(self, model: Model, settings: SessionSettings, *, max_sessions: int, state_dir: Path,
                 parallel: int = 1, queue: int = 16):
        if not 1 <= parallel <= max_sessions:
            raise ValueError(f"--parallel ({parallel}) must be between 1 and --max-sessions ({max_sessions})")
        self.model, self.settings = model, settings
        self.max_sessions, self.parallel, self.queue = max_sessions, parallel, queue
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the tables below
        self._slots = threading.Semaphore(parallel)
        self._admitted = 0
        self.conversations: dict[str, Conversation] = {}
        self.by_digest: dict[str, str] = {}
        self.saves = self.restores = 0
        self._load_index()

    # -- disk -------------------------------------------------------------------------------
    def _path(self, cid: str) -> Path:
        return self.state_dir / f"{cid}.npz"

    def _load_index(self) -> None:
        """The conversations a previous server saved into the state directory."""
        for path in sorted(self.state_dir.glob("*.json")):
            meta = json.loads(path.read_text())
            if self._path(meta["id"]).exists():
                self.conversations[meta["id"]] = Conversation(meta["id"], meta["digest"], meta["n_messages"])
                self.by_digest[meta["digest"]] = meta["id"]

    def _save(self, conv: Conversation) -> None:
        """Write the conversation's session and its index entry, and close the session."""
        conv.session.save(self._path(conv.id))
        meta = self.state_dir / f"{conv.id}.json"
        tmp = meta.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"id": conv.id, "digest": conv.digest, "n_messages": conv.n_messages}))
        os.replace(tmp, meta)
        conv.session.close()
        conv.session = None
        self.saves += 1

    def save_all(self) -> None:
        """Save every live conversation (at shutdown): a restarted server continues them."""
        for conv in list(self.conversations.values()):
            with conv.lock:
                if conv.session is not None:
                    self._save(conv)

    # -- admission --------------------------------------------------------------------------
    def admit(self) -> None:
        with self._lock:
            if self._admitted >= self.parallel + self.queue:
                raise Busy()
            self._admitted += 1

    def leave(self) -> None:
        with self._lock:
            self._admitted -= 1

    @property
    def in_flight(self) -> int:
        return self._admitted

    # -- finding ----------------------------------------------------------------------------
    def find(self, digests: list[str], session_id: str | None) -> Conversation:
        """The conversation a chat request continues: the one named by `session_id` (made if new),
        else the one whose digest is that of the longest prefix of the request's messages (at least
        the last message new), else a new one. `digests`: `api.chain` of the request's messages."""
        with self._lock:
            if session_id is not None:
                if not SESSION_ID.match(session_id):
                    raise ApiError(400, "X-Session-Id takes 1 to 64 letters, digits, '.', '_' or '-'",
                                   param="X-Session-Id")
                return self.conversations.setdefault(session_id, Conversation(session_id, ROOT))
            for n in range(len(digests) - 2, 0, -1):
                cid = self.by_digest.get(digests[n])
                if cid is not None:
                    return self.conversations[cid]
            return self.new()

    def new(self) -> Conversation:
        cid = uuid.uuid4().hex[:16]
        conv = self.conversations[cid] = Conversation(cid, ROOT)
        return conv

    @staticmethod
    def held(conv: Conversation, digests: list[str], session_id: str | None) -> int | None:
        """Under the conversation's lock: how many of the request's messages its stream already
        holds, or None when it no longer continues into them (another request moved it on
        meanwhile: find again). A conversation named by `session_id` takes either its whole
        history again or only its new messages (held 0)."""
        if conv.n_messages < len(digests) and digests[conv.n_messages] == conv.digest:
            return conv.n_messages
        return 0 if session_id is not None else None

    def record(self, conv: Conversation, digest: str, n_messages: int) -> None:
        """The stream now holds `n_messages` messages whose chain digest is `digest`."""
        with self._lock:
            if self.by_digest.get(conv.digest) == conv.id:
                del self.by_digest[conv.digest]
            conv.digest, conv.n_messages = digest, n_messages
            self.by_digest[digest] = conv.id

    def discard(self, conv: Conversation) -> None:
        """Close and forget a conversation no request can continue (a completion without a session id)."""
        with self._lock:
            self.conversations.pop(conv.id, None)
        if conv.session is not None:
            conv.session.close()
            conv.session = None

    def forget_if_empty(self, conv: Conversation) -> None:
        """Drop a conversation whose first request failed before anything was kept."""
        if conv.n_messages == 0:
            self.discard(conv)

    # -- slots and sessions -----------------------------------------------------------------
    def slot(self) -> threading.Semaphore:
        return self._slots

    def live(self, conv: Conversation) -> StreamSession:
        """The conversation's session, made live (restored from disk, or new) under its lock and a
        slot; the least recently used unlocked live conversation is saved to make room."""
        conv.last_used = time.monotonic()
        if conv.session is not None:
            return conv.session
        with self._lock:
            live = [c for c in self.conversations.values() if c.session is not None]
        while len(live) >= self.max_sessions:
            idle = sorted((c for c in live if not c.lock.locked()), key=lambda c: c.last_used)
            victim = next((c for c in idle if c.lock.acquire(blocking=False)), None)
            if victim is None:
                raise RuntimeError("no live conversation can be saved to make room")  # cannot happen: see the module
            try:
                if victim.session is not None:
                    self._save(victim)
            finally:
                victim.lock.release()
            live.remove(victim)
        s = self.settings
        path = self._path(conv.id)
        if path.exists() and conv.n_messages:
            conv.session = StreamSession.restore(path, self.model, n_threads=s.n_threads, mmproj=s.mmproj,
                                                 history=s.history)
            self.restores += 1
        else:
            conv.session = s.new_session(self.model)
        return conv.session

    def measure_session(self) -> float:
        """Resident MiB one conversation adds: a session made, its cache filled, saved and restored
        (the copies a save and a restore make included), kept. Run once before serving; the
        server's memory is bounded by its resident size then plus `max_sessions + parallel` of
        these (a slot may hold the copy of a state being saved or restored)."""
        s = self.settings
        before = rss_mib() or 0.0
        with tempfile.TemporaryDirectory() as tmp:
            with s.new_session(self.model, history=0) as probe:
                probe.chat_template()
                filler = self.model.tokenize("The quick brown fox jumps over the lazy dog. " * s.policy.budget)
                probe.feed_tokens(filler[:s.policy.budget + s.chunk])
                probe.save(Path(tmp) / "probe.npz")
            with StreamSession.restore(Path(tmp) / "probe.npz", self.model, n_threads=s.n_threads, mmproj=s.mmproj,
                                       history=s.history):
                return max(0.0, (rss_mib() or 0.0) - before)

    def stats(self) -> dict:
        with self._lock:
            convs = list(self.conversations.values())
        live = [c.session for c in convs if c.session is not None]
        return {"sessions_live": len(live), "sessions_on_disk": sum(c.session is None and c.n_messages > 0
                                                                     for c in convs),
                "cells_cached": sum(s.stats.cells_cached for s in live),
                "cells_evicted": sum(s.stats.cells_evicted for s in live),
                "evictions": sum(s.stats.evictions for s in live), "saves": self.saves, "restores": self.restores,
                "memory_tokens": sum(s.memory.stats.tokens_stored for s in live if s.memory is not None)}
