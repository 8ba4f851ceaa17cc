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

The pieces: `admission` (slots and the queue), `live` (the live set, least recently used out),
`journal` (the files on disk, the snapshots); `ConversationStore` finds a request's conversation
and keeps the table of them.
"""
from __future__ import annotations

import ctypes
import re
import tempfile
import threading
import uuid
from pathlib import Path

from ..probes import rss_mib
from ..runtime import Model
from ..session import StreamSession
from .admission import Admission, Busy
from .api import ROOT, ApiError
from .journal import Journal, read_history
from .live import Conversation, LiveSet, SessionSettings

__all__ = ["Busy", "Conversation", "ConversationStore", "SessionSettings", "limit_malloc_arenas", "published_state",
           "read_history"]

SESSION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(n: int = 2) -> None:
    """Let glibc keep at most `n` heaps: it gives every thread that allocates one of its own, and
    with requests served from many threads the freed pages of save buffers stayed in each (43 MiB
    over the concurrency test). A no-op where the C library is not glibc. (The pages a save or a
    restore frees go back to the OS in `session.return_freed_memory`.)"""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, n)
    except (OSError, AttributeError):
        pass


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


class ConversationStore:
    """The conversations: found from a request's messages (or its session id), made live, logged
    when a request completes, rolled back when one fails; read by the views."""

    def __init__(self, model: Model, settings: SessionSettings, *, max_sessions: int, state_dir: Path,
                 parallel: int = 1, queue: int = 16, snapshot_after: float = 2.0):
        if not 1 <= parallel <= max_sessions:
            raise ValueError(f"--parallel ({parallel}) must be between 1 and --max-sessions ({max_sessions})")
        self.model, self.settings = model, settings
        self.max_sessions, self.parallel, self.queue = max_sessions, parallel, queue
        self.admission = Admission(parallel, queue)
        self.journal = Journal(state_dir, model, settings, snapshot_after=snapshot_after)
        self.state_dir = self.journal.state_dir
        self.live_set = LiveSet(max_sessions, self.journal)
        self._lock = threading.Lock()  # guards the tables below
        self.conversations: dict[str, Conversation] = {}
        self.by_digest: dict[str, str] = {}
        for conv in self.journal.load_index():
            self.conversations[conv.id] = conv
            self.by_digest[conv.digest] = conv.id

    # -- finding ----------------------------------------------------------------------------
    def find(self, digests: list[str], session_id: str | None) -> Conversation:
        """The conversation a chat request continues: the one named by `session_id` (made if new),
        else the one whose digest is that of the longest prefix of the request's messages (at least
        the last message new), else a new one. `digests`: `api.turn_digests` of the request's messages."""
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

    # -- a request's life -------------------------------------------------------------------
    def live(self, conv: Conversation) -> StreamSession:
        """Under the conversation's lock and a slot: its session, live (`LiveSet.session`)."""
        return self.live_set.session(conv)

    def record(self, conv: Conversation, digest: str, n_messages: int, entry: dict | None) -> None:
        """Under the conversation's lock, a request done: the stream now holds `n_messages` messages
        whose chain digest is `digest`. `entry` (what the request fed and the reply, as `replay`
        reads it) goes to the conversation's log first, fsync'd; None for a conversation that
        is not kept (a completion without a session id)."""
        if entry is not None:
            self.journal.append(conv, entry, n_messages, digest)
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
        self.live_set.close(conv)

    def discard(self, conv: Conversation) -> None:
        """Close and forget a conversation no request can continue (a completion without a session
        id, a first request that failed)."""
        with self._lock:
            self.conversations.pop(conv.id, None)
        self.live_set.close(conv)

    # -- the server's start and end ---------------------------------------------------------
    def start_snapshots(self) -> None:
        """Write the snapshots of idle conversations in a thread of their own, off the requests' path."""
        self.journal.start_snapshots(self.live_set.conversations)

    def save_all(self) -> None:
        """Save every live conversation (at shutdown): a restarted server restores them without a replay."""
        self.journal.stop_snapshots()
        for conv in list(self.conversations.values()):
            with conv.lock:
                if conv.session is not None:
                    self.journal.save(conv)
                    self.live_set.close(conv)

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
                probe.feed_tokens(filler[:s.policy.budget + s.config.chunk])
                probe.save(Path(tmp) / "probe.npz")
            with StreamSession.restore(Path(tmp) / "probe.npz", self.model, n_threads=s.config.n_threads,
                                       mmproj=s.mmproj,
                                       view_tokens=s.view_tokens):
                return max(0.0, (rss_mib() or 0.0) - before)

    # -- readers ----------------------------------------------------------------------------
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
        counters = self.journal.counters.snapshot()
        live = [c.published for c in convs if c.session is not None and c.published]
        return {"sessions_live": sum(c.session is not None for c in convs),
                "sessions_on_disk": sum(c.session is None and c.n_messages > 0 for c in convs),
                "cells_cached": sum(p["cells_cached"] for p in live),
                "cells_evicted": sum(p["cells_evicted"] for p in live),
                "evictions": sum(p["evictions"] for p in live), **counters,
                "memory_tokens": sum(p["memory"]["tokens_stored"] for p in live if p["memory"])}
