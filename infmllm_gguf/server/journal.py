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
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..state import fsync_directory, replacing
from .api import ROOT, Turn

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
