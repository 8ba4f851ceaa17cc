"""The server's conversations: each a `StreamSession` over one shared model, found again from the
messages a client repeats, at most `max_sessions` of them holding a llama.cpp context, the rest
on disk and restored when their next request comes; every completed request durable before its
reply ends (`journal`).

Locking: a request first takes a slot (at most `parallel` requests work at once; beyond the
`queue` waiting ones the server answers 503), then its conversation's lock (two requests to one
conversation run one after the other). A conversation's session is made live only under both, so
a live session that is not locked is free to be saved and closed. Readers (the session view,
/health, /metrics) never touch a live session: they read what the last completed request
published (`Conversation.published`).
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
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
from ..state import read_header
from .api import ROOT, ApiError, Turn
from .journal import IndexEntry, TurnLog, continuing, turn_from_json

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
    session: StreamSession | None = None  # None while on disk
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    last_used: float = field(default_factory=time.monotonic)
    snapshot_messages: int = 0   # the messages its snapshot on disk holds (the log holds the rest)
    published: dict = field(default_factory=dict)  # what readers see: the state after the last request


@dataclass
class SessionSettings:
    """What each conversation's session is made with."""
    policy: Policy
    chunk: int = 256
    n_threads: int | None = None
    flash_attn: bool | None = None
    mmproj: str | os.PathLike | None = None
    view_tokens: int = 4096  # stream tokens kept for the web page's view
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    memory: MemoryConfig | None = None

    def new_session(self, model: Model, *, view_tokens: int | None = None) -> StreamSession:
        return StreamSession(model, self.policy, chunk=self.chunk, n_threads=self.n_threads, flash_attn=self.flash_attn,
                             mmproj=self.mmproj,
                             view_tokens=self.view_tokens if view_tokens is None else view_tokens,
                             cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v, memory=self.memory)


def read_history(session: StreamSession, turns: list[Turn], system: str | None = None) -> None:
    """Feed messages the stream has not read, without sampling (`StreamSession.read_turns`)."""
    session.read_turns([(t.role, t.text, t.images) for t in turns], system)


def replay(session: StreamSession, entry: dict) -> None:
    """Read a logged request again: its messages and the reply it got."""
    if entry["kind"] == "completion":
        session.feed_prompt(entry["prompt"])
        session.feed_text(entry["reply"])
        return
    turns = [turn_from_json(t) for t in entry["turns"]]
    system = turns.pop(0).text if turns[0].role == "system" else None
    read_history(session, turns + [Turn("assistant", entry["reply"])], system)


def published_state(session: StreamSession) -> dict:
    """What the session view shows: the cache, the memory and the end of the stream."""
    st = session.stats
    memory = None
    if session.memory is not None:
        m = session.memory.stats
        memory = {"ranking": session.memory.config.ranking, "tokens_stored": m.tokens_stored,
                  "host_bytes": m.host_bytes, "tokens_recalled": m.tokens_recalled, "recall_s": round(m.recall_s, 3),
                  "images_stored": m.images_stored, "images_recalled": m.images_recalled,
                  "last_recalled": m.last_recalled}
    return {"cells_cached": st.cells_cached, "budget": session.policy.budget, "tokens_seen": st.tokens_seen,
            "cells_evicted": st.cells_evicted, "evictions": st.evictions, "image_tokens_seen": st.image_tokens_seen,
            "memory": memory, "view": session.recent_view()}


class Busy(Exception):
    """Every slot and the queue are taken."""


class ConversationStore:
    def __init__(self, model: Model, settings: SessionSettings, *, max_sessions: int, state_dir: Path,
                 parallel: int = 1, queue: int = 16, snapshot_after: float = 2.0):
        if not 1 <= parallel <= max_sessions:
            raise ValueError(f"--parallel ({parallel}) must be between 1 and --max-sessions ({max_sessions})")
        self.model, self.settings = model, settings
        self.max_sessions, self.parallel, self.queue = max_sessions, parallel, queue
        self.snapshot_after = snapshot_after  # seconds a conversation is idle before its snapshot is written
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the tables below and the counters
        self._slots = threading.Semaphore(parallel)
        self._admitted = 0
        self.conversations: dict[str, Conversation] = {}
        self.by_digest: dict[str, str] = {}
        self.saves = self.restores = self.replays = self.logged = 0
        self.log_s = self.snapshot_s = 0.0  # what durability costs: the turn log's appends, the snapshots
        self._stop = threading.Event()
        self._snapshotter: threading.Thread | None = None
        self._load_index()

    # -- disk -------------------------------------------------------------------------------
    def _path(self, cid: str, suffix: str = ".npz") -> Path:
        return self.state_dir / f"{cid}{suffix}"

    def _log(self, cid: str) -> TurnLog:
        return TurnLog(self._path(cid, ".log"))

    def _load_index(self) -> None:
        """The conversations a previous server left in the state directory, each at its last
        completed request: its snapshot's messages, then those its log adds."""
        for tmp in self.state_dir.glob("*.tmp"):  # a write a crash cut short: the file it replaces is whole
            tmp.unlink()
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                entry = IndexEntry.read(path)
                if entry.n_messages and not self._path(entry.id).exists():
                    raise ValueError(f"its snapshot {self._path(entry.id).name} is missing")
                conv = Conversation(entry.id, entry.digest, entry.n_messages, snapshot_messages=entry.n_messages)
                for logged in continuing(self._log(entry.id).entries(), entry.n_messages):
                    conv.digest, conv.n_messages = logged["digest"], logged["after"]
            except (ValueError, KeyError, TypeError, OSError) as exc:
                sys.stderr.write(f"warning: {path.name} is skipped: {exc}\n")
                continue
            if conv.n_messages:
                self.conversations[conv.id] = conv
                self.by_digest[conv.digest] = conv.id

    def _save(self, conv: Conversation) -> None:
        """Under the conversation's lock: write its session's snapshot, then its index entry, then
        clear its log (a crash in between leaves entries that `continuing` skips)."""
        if conv.snapshot_messages == conv.n_messages and self._path(conv.id).exists():
            return  # the snapshot is current
        t0 = time.perf_counter()
        conv.session.save(self._path(conv.id), extra={"conversation": {"n_messages": conv.n_messages,
                                                                       "digest": conv.digest}})
        IndexEntry(conv.id, conv.n_messages, conv.digest).write(self._path(conv.id, ".json"))
        self._log(conv.id).clear()
        conv.snapshot_messages = conv.n_messages
        with self._lock:
            self.saves += 1
            self.snapshot_s += time.perf_counter() - t0

    def _close(self, conv: Conversation) -> None:
        conv.session.close()
        conv.session = None

    def save_all(self) -> None:
        """Save every live conversation (at shutdown): a restarted server restores them without a replay."""
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        for conv in list(self.conversations.values()):
            with conv.lock:
                if conv.session is not None:
                    self._save(conv)
                    self._close(conv)

    def start_snapshots(self) -> None:
        """Write the snapshots of idle conversations in a thread of their own, off the requests' path."""
        self._snapshotter = threading.Thread(target=self._snapshot_idle, name="snapshots", daemon=True)
        self._snapshotter.start()

    def _snapshot_idle(self) -> None:
        while not self._stop.wait(self.snapshot_after / 2):
            with self._lock:
                pending = [c for c in self.conversations.values() if c.session is not None
                           and c.n_messages > c.snapshot_messages
                           and time.monotonic() - c.last_used >= self.snapshot_after]
            for conv in pending:
                if not conv.lock.acquire(blocking=False):
                    continue  # a request holds it: next time
                try:
                    if conv.session is not None:
                        self._save(conv)
                except (OSError, ValueError, RuntimeError) as exc:  # the log still holds every turn
                    sys.stderr.write(f"warning: the snapshot of conversation {conv.id} failed: {exc}\n")
                finally:
                    conv.lock.release()

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

    def record(self, conv: Conversation, digest: str, n_messages: int, entry: dict | None) -> None:
        """Under the conversation's lock, a request done: the stream now holds `n_messages` messages
        whose chain digest is `digest`. `entry` (what the request fed and the reply, as `replay`
        reads it) goes to the conversation's log first, fsync'd; None for a conversation that
        is not kept (a completion without a session id)."""
        if entry is not None:
            t0 = time.perf_counter()
            index = self._path(conv.id, ".json")
            if not index.exists():
                IndexEntry(conv.id).write(index)
            self._log(conv.id).append({**entry, "before": conv.n_messages, "after": n_messages, "digest": digest})
            with self._lock:
                self.logged += 1
                self.log_s += time.perf_counter() - t0
        published = published_state(conv.session)
        with self._lock:
            if self.by_digest.get(conv.digest) == conv.id:
                del self.by_digest[conv.digest]
            conv.digest, conv.n_messages, conv.published = digest, n_messages, published
            self.by_digest[digest] = conv.id

    def rollback(self, conv: Conversation) -> None:
        """Under the conversation's lock, a request that failed or ran out of time: drop what it
        fed. The live session is closed unsaved; the next request restores the conversation at
        its last completed request (snapshot and log)."""
        if conv.session is not None:
            self._close(conv)

    def discard(self, conv: Conversation) -> None:
        """Close and forget a conversation no request can continue (a completion without a session
        id, a first request that failed)."""
        with self._lock:
            self.conversations.pop(conv.id, None)
        if conv.session is not None:
            self._close(conv)

    # -- slots and sessions -----------------------------------------------------------------
    def slot(self) -> threading.Semaphore:
        return self._slots

    def live(self, conv: Conversation) -> StreamSession:
        """The conversation's session, made live (restored from disk, or new) under its lock and a
        slot; the least recently used unlocked live conversation is closed to make room (saved
        first unless its snapshot is current)."""
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
                    self._close(victim)
            finally:
                victim.lock.release()
            live.remove(victim)
        conv.session = self._restore(conv)
        return conv.session

    def _restore(self, conv: Conversation) -> StreamSession:
        """The conversation at its last completed request: its snapshot (or a new session), then
        the requests its log holds beyond it, read again."""
        s, path = self.settings, self._path(conv.id)
        entries = self._log(conv.id).entries()
        if path.exists() and conv.n_messages:
            session = StreamSession.restore(path, self.model, n_threads=s.n_threads, mmproj=s.mmproj,
                                            view_tokens=s.view_tokens)
            extra = read_header(path).get("extra", {}).get("conversation")
            # a snapshot from before the log (index schema 1) holds what its index entry says
            held = conv.snapshot_messages if extra is None else extra["n_messages"]
            with self._lock:
                self.restores += 1
        else:
            session, held = s.new_session(self.model), 0
        try:
            for entry in continuing(entries, held):
                replay(session, entry)
                with self._lock:
                    self.replays += 1
        except Exception:
            session.close()
            raise
        return session

    def measure_session(self) -> float:
        """Resident MiB one conversation adds: a session made, its cache filled, saved and restored
        (the copies a save and a restore make included), kept. Run once before serving; the
        server's memory is bounded by its resident size then plus `max_sessions + parallel + 1` of
        these (each slot and the snapshot thread may hold the copy of a state being saved or restored)."""
        s = self.settings
        before = rss_mib() or 0.0
        with tempfile.TemporaryDirectory() as tmp:
            with s.new_session(self.model, view_tokens=0) as probe:
                probe.chat_template()
                filler = self.model.tokenize("The quick brown fox jumps over the lazy dog. " * s.policy.budget)
                probe.feed_tokens(filler[:s.policy.budget + s.chunk])
                probe.save(Path(tmp) / "probe.npz")
            with StreamSession.restore(Path(tmp) / "probe.npz", self.model, n_threads=s.n_threads, mmproj=s.mmproj,
                                       view_tokens=s.view_tokens):
                return max(0.0, (rss_mib() or 0.0) - before)

    def view(self, cid: str) -> dict | None:
        """A conversation as its last completed request left it (None: no such conversation)."""
        with self._lock:  # a request completing publishes its count, digest and state at once
            conv = self.conversations.get(cid)
            if conv is None:
                return None
            return {"id": conv.id, "live": conv.session is not None, "messages": conv.n_messages, **conv.published}

    def stats(self) -> dict:
        """Counts over the conversations, from what each last published."""
        with self._lock:
            convs = list(self.conversations.values())
            counters = {"saves": self.saves, "restores": self.restores, "replays": self.replays,
                        "logged": self.logged, "log_s": self.log_s, "snapshot_s": self.snapshot_s}
        live = [c.published for c in convs if c.session is not None and c.published]
        return {"sessions_live": sum(c.session is not None for c in convs),
                "sessions_on_disk": sum(c.session is None and c.n_messages > 0 for c in convs),
                "cells_cached": sum(p["cells_cached"] for p in live),
                "cells_evicted": sum(p["cells_evicted"] for p in live),
                "evictions": sum(p["evictions"] for p in live), **counters,
                "memory_tokens": sum(p["memory"]["tokens_stored"] for p in live if p["memory"])}
