"""What makes a conversation survive a crash: every completed request is appended to the
conversation's turn log and fsync'd before its reply ends; snapshots of the whole session are
written later, off the request path, and a restore replays the log over the last snapshot.

On disk, per conversation `ID`:
    ID.json   its index entry (`INDEX_SCHEMA`): the messages and digest of its last snapshot
    ID.npz    that snapshot (`StreamSession.save`; absent until the first one)
    ID.log    one JSON line per request completed since, each naming the message count it
              continues from (`before`), so that entries the snapshot already holds are skipped
Every file but the log is replaced atomically (written aside, fsync'd, renamed, the directory
fsync'd); the log is only appended to, and a line torn by a crash is cut off when it is read.

`Journal` keeps a state directory: it loads its index, appends to the logs, writes the snapshots
(those of idle conversations in a thread of its own) and restores a conversation from them.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..runtime import Model
from ..session import StreamSession
from ..state import fsync_directory, read_header, replacing
from .api import ROOT, Turn
from .live import Conversation, SessionSettings
from .metrics import disk_counters

INDEX_SCHEMA = 2  # 1: {"id", "digest", "n_messages"} with the snapshot always present (before the log)


@dataclass
class IndexEntry:
    """A conversation as its snapshot left it."""
    id: str
    n_messages: int = 0
    digest: str = ROOT

    @classmethod
    def read(cls, path: Path) -> "IndexEntry":
        """An index file of any schema this version knows (ValueError for others)."""
        meta = json.loads(path.read_text())
        schema = meta.get("schema", 1)
        if not isinstance(schema, int) or schema > INDEX_SCHEMA:
            raise ValueError(f"{path} was written by a newer infmllm-gguf (index schema {schema}; this one reads "
                             f"up to {INDEX_SCHEMA})")
        return cls(str(meta["id"]), int(meta["n_messages"]), str(meta["digest"]))

    def write(self, path: Path) -> None:
        with replacing(path) as f:
            f.write(json.dumps({"schema": INDEX_SCHEMA, "id": self.id, "n_messages": self.n_messages,
                                "digest": self.digest}).encode())


def turn_to_json(turn: Turn) -> dict:
    return {"role": turn.role, "text": turn.text, "images": [base64.b64encode(i).decode() for i in turn.images],
            "image_digests": list(turn.image_digests)}


def turn_from_json(data: dict) -> Turn:
    return Turn(data["role"], data["text"], tuple(base64.b64decode(i) for i in data["images"]),
                tuple(data["image_digests"]))


class TurnLog:
    """A conversation's append-only log of completed requests."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, entry: dict) -> None:
        """Add one entry, durably: it is on disk when this returns."""
        new = not self.path.exists()
        with open(self.path, "ab") as f:
            f.write(json.dumps(entry, ensure_ascii=False).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_directory(self.path.parent)

    def entries(self) -> list[dict]:
        """The complete entries, in order; a last line torn by a crash is cut off the file."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out, good = [], 0
        for line in data.split(b"\n")[:-1]:  # what follows the last newline was never completed
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a torn write: nothing after it was acknowledged
            good += len(line) + 1
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        return out

    def clear(self) -> None:
        """After a snapshot that holds every entry."""
        self.path.unlink(missing_ok=True)


def continuing(entries: list[dict], n_messages: int) -> list[dict]:
    """The entries that continue a stream holding `n_messages` messages, in order (those a snapshot
    already holds are skipped: a crash may come between a snapshot and the log's clearing)."""
    out = []
    for entry in entries:
        if entry["before"] == n_messages:
            out.append(entry)
            n_messages = entry["after"]
    return out


def read_history(session: StreamSession, turns: list[Turn], system: str | None = None,
                 tools: list[dict] | None = None) -> None:
    """Feed messages the stream has not read, without sampling (`StreamSession.read_turns`; `tools`:
    those the conversation declares, with its first messages)."""
    session.read_turns([(t.role, t.text, t.images) for t in turns], system, tools)


def replay(session: StreamSession, entry: dict) -> None:
    """Read a logged request again: its messages and the reply it got."""
    if entry["kind"] == "completion":
        session.feed_prompt(entry["prompt"])
        session.feed_text(entry["reply"])
        return
    turns = [turn_from_json(t) for t in entry["turns"]]
    system = turns.pop(0).text if turns[0].role == "system" else None
    read_history(session, turns + [Turn("assistant", entry["reply"])], system, entry.get("tools"))


class Journal:
    """The conversations' files in `state_dir` (see the module), and what writing them costs."""

    def __init__(self, state_dir: Path, model: Model, settings: SessionSettings, *, snapshot_after: float = 2.0):
        self.state_dir, self.model, self.settings = Path(state_dir), model, settings
        self.snapshot_after = snapshot_after  # seconds a conversation is idle before its snapshot is written
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.counters = disk_counters()
        self._stop = threading.Event()
        self._snapshotter: threading.Thread | None = None

    def path(self, cid: str, suffix: str = ".npz") -> Path:
        return self.state_dir / f"{cid}{suffix}"

    def log(self, cid: str) -> TurnLog:
        return TurnLog(self.path(cid, ".log"))

    def load_index(self) -> list[Conversation]:
        """The conversations a previous server left in the state directory, each at its last
        completed request: its snapshot's messages, then those its log adds."""
        for tmp in self.state_dir.glob("*.tmp"):  # a write a crash cut short: the file it replaces is whole
            tmp.unlink()
        out = []
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                entry = IndexEntry.read(path)
                if entry.n_messages and not self.path(entry.id).exists():
                    raise ValueError(f"its snapshot {self.path(entry.id).name} is missing")
                conv = Conversation(entry.id, entry.digest, entry.n_messages, snapshot_messages=entry.n_messages)
                for logged in continuing(self.log(entry.id).entries(), entry.n_messages):
                    conv.digest, conv.n_messages = logged["digest"], logged["after"]
            except (ValueError, KeyError, TypeError, OSError) as exc:
                sys.stderr.write(f"warning: {path.name} is skipped: {exc}\n")
                continue
            if conv.n_messages:
                out.append(conv)
        return out

    def append(self, conv: Conversation, entry: dict, n_messages: int, digest: str) -> None:
        """Under the conversation's lock: log a completed request, durably (`entry`: what it fed and
        the reply, as `replay` reads it), before the conversation moves on to `n_messages`."""
        t0 = time.perf_counter()
        index = self.path(conv.id, ".json")
        if not index.exists():
            IndexEntry(conv.id).write(index)
        self.log(conv.id).append({**entry, "before": conv.n_messages, "after": n_messages, "digest": digest})
        self.counters.add(logged=1, log_s=time.perf_counter() - t0)

    def save(self, conv: Conversation) -> None:
        """Under the conversation's lock: write its session's snapshot, then its index entry, then
        clear its log (a crash in between leaves entries that `continuing` skips)."""
        if conv.snapshot_messages == conv.n_messages and self.path(conv.id).exists():
            return  # the snapshot is current
        t0 = time.perf_counter()
        conv.session.save(self.path(conv.id), extra={"conversation": {"n_messages": conv.n_messages,
                                                                      "digest": conv.digest}})
        IndexEntry(conv.id, conv.n_messages, conv.digest).write(self.path(conv.id, ".json"))
        self.log(conv.id).clear()
        conv.snapshot_messages = conv.n_messages
        self.counters.add(saves=1, snapshot_s=time.perf_counter() - t0)

    def restore(self, conv: Conversation) -> StreamSession:
        """The conversation at its last completed request: its snapshot (or a new session), then
        the requests its log holds beyond it, read again."""
        s, path = self.settings, self.path(conv.id)
        entries = self.log(conv.id).entries()
        if path.exists() and conv.n_messages:
            session = StreamSession.restore(path, self.model, n_threads=s.config.n_threads, mmproj=s.mmproj,
                                            view_tokens=s.view_tokens)
            extra = read_header(path).get("extra", {}).get("conversation")
            # a snapshot from before the log (index schema 1) holds what its index entry says
            held = conv.snapshot_messages if extra is None else extra["n_messages"]
            self.counters.add(restores=1)
        else:
            session, held = s.new_session(self.model), 0
        try:
            for entry in continuing(entries, held):
                replay(session, entry)
                self.counters.add(replays=1)
        except Exception:
            session.close()
            raise
        return session

    # -- the snapshots of idle conversations, off the requests' path -------------------------
    def start_snapshots(self, live: Callable[[], list[Conversation]]) -> None:
        """Write the snapshot of each conversation of `live()` idle for `snapshot_after` seconds."""
        self._snapshotter = threading.Thread(target=self._snapshot_idle, args=(live,), name="snapshots", daemon=True)
        self._snapshotter.start()

    def stop_snapshots(self) -> None:
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join()

    def _snapshot_idle(self, live: Callable[[], list[Conversation]]) -> None:
        while not self._stop.wait(self.snapshot_after / 2):
            pending = [c for c in live() if c.session is not None and c.n_messages > c.snapshot_messages
                       and time.monotonic() - c.last_used >= self.snapshot_after]
            for conv in pending:
                if not conv.lock.acquire(blocking=False):
                    continue  # a request holds it: next time
                try:
                    if conv.session is not None:
                        self.save(conv)
                except (OSError, ValueError, RuntimeError) as exc:  # the log still holds every turn
                    sys.stderr.write(f"warning: the snapshot of conversation {conv.id} failed: {exc}\n")
                finally:
                    conv.lock.release()
