"""Where the memory keeps the stream's text: host RAM up to a cap, then (optionally) a file on disk."""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

RECORD = np.dtype([("id", "<i4"), ("index", "<i8")])  # one token on disk: 12 bytes


class TokenStore:
    """The stream's text tokens in order: ids and stream indices, appended in pieces and joined
    when read. Beyond `cap` tokens in RAM (checked now and then: see `append`), the oldest are appended to the file `spill` (when
    given) or dropped. `copy_indices` / `copy_of` map the stream indices of re-read tokens to the
    stored tokens they copy, so a block the cache holds as a copy is not re-read again.

    The file grows by appends only; its SHA-256 is kept as it grows, so that a save names the
    file's contents and a load can tell a missing, truncated or altered file (the session then
    goes on with what RAM holds, and says so). A write that fails (a full disk) turns spilling off
    with a warning: the oldest tokens are dropped from then on."""

    BYTES_PER_TOKEN = RECORD.itemsize

    def __init__(self, cap: int, spill: str | os.PathLike | None = None):
        self.cap = cap
        self.spill = None if spill is None else Path(spill)
        self.spilled = 0  # tokens in the file
        self._digest = hashlib.sha256()
        self.dropped = 0
        self._pieces: list[tuple[np.ndarray, np.ndarray]] = []
        self.copy_indices = np.zeros(0, dtype=np.int64)  # stream indices of re-read tokens
        self.copy_of = np.zeros(0, dtype=np.int64)       # the stream index each one copies

    def __len__(self) -> int:
        return self.spilled + sum(ids.size for ids, _ in self._pieces)

    @property
    def in_ram(self) -> int:
        return sum(ids.size for ids, _ in self._pieces)

    def append(self, ids: Sequence[int], indices: np.ndarray) -> None:
        self._pieces.append((np.asarray(ids, dtype=np.int32), np.asarray(indices, dtype=np.int64)))
        # joined now and then, not at each append (a join copies the RAM part): RAM holds at most
        # cap + max(cap / 8, 1024) tokens and 64 pieces
        if len(self._pieces) > 64 or self.in_ram > self.cap + max(self.cap // 8, 1024):
            self.join()

    def join(self) -> tuple[np.ndarray, np.ndarray]:
        """The RAM part as one piece (returned), the oldest beyond the cap moved to the file or dropped."""
        if len(self._pieces) != 1:
            ids = np.concatenate([p[0] for p in self._pieces]) if self._pieces else np.zeros(0, np.int32)
            indices = np.concatenate([p[1] for p in self._pieces]) if self._pieces else np.zeros(0, np.int64)
            self._pieces = [(ids, indices)]
        ids, indices = self._pieces[0]
        if ids.size > self.cap:
            over = ids.size - self.cap
            self._write(ids[:over], indices[:over])
            ids, indices = ids[over:].copy(), indices[over:].copy()
            self._pieces = [(ids, indices)]
        return ids, indices

    def _write(self, ids: np.ndarray, indices: np.ndarray) -> None:
        if self.spill is None:
            self.dropped += ids.size
            return
        records = np.empty(ids.size, dtype=RECORD)
        records["id"], records["index"] = ids, indices
        try:
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spill, "ab") as f:
                f.seek(self.spilled * RECORD.itemsize)
                f.truncate()
                f.write(records.tobytes())
        except OSError as exc:
            warnings.warn(f"the memory cannot write {self.spill} ({exc}): it keeps {self.cap:,} tokens in RAM and "
                          "drops the oldest from now on", stacklevel=4)
            self.spill = None
            self.dropped += ids.size
            return
        self._digest.update(records.tobytes())
        self.spilled += ids.size

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32[n], stream indices int64[n]) of every stored token, oldest first (the file's
        part read from it)."""
        ids, indices = self.join()
        if not self.spilled:
            return ids, indices
        disk = np.fromfile(self.spill, dtype=RECORD, count=self.spilled)
        return np.concatenate((disk["id"], ids)), np.concatenate((disk["index"], indices))

    def add_copies(self, copy_indices: np.ndarray, originals: np.ndarray) -> None:
        self.copy_indices = np.concatenate((self.copy_indices, copy_indices))
        self.copy_of = np.concatenate((self.copy_of, originals))

    def held(self, indices: np.ndarray, cached: np.ndarray) -> np.ndarray:
        """bool[n]: whether the cache holds each stored token (`indices`), itself or a copy of it.
        Copies no longer cached are forgotten."""
        live = np.isin(self.copy_indices, cached)
        self.copy_indices, self.copy_of = self.copy_indices[live], self.copy_of[live]
        return np.isin(indices, cached) | np.isin(indices, self.copy_of)

    # -- state ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The RAM part as arrays; the file by name, length and SHA-256 (it is not copied)."""
        ids, indices = self.join()
        meta = {"dropped": self.dropped, "spill": None if self.spill is None else str(self.spill),
                "spilled": self.spilled, "sha256": self._digest.hexdigest()}
        return meta, {"ids": ids, "indices": indices, "copy_indices": self.copy_indices, "copy_of": self.copy_of}

    @staticmethod
    def check_state(meta: dict, arrays: dict[str, np.ndarray]) -> None:
        ids, indices = arrays.get("ids"), arrays.get("indices")
        if ids is None or indices is None or ids.ndim != 1 or ids.shape != indices.shape:
            raise ValueError("the saved memory's token ids and stream indices are missing or do not match")
        if indices.size and np.any(np.diff(indices) <= 0):
            raise ValueError("the saved memory's stream indices are not increasing")
        copies, of = arrays.get("copy_indices"), arrays.get("copy_of")
        if copies is None or of is None or copies.shape != of.shape:
            raise ValueError("the saved memory's copies are missing or do not match")
        if not isinstance(meta.get("dropped"), int) or not isinstance(meta.get("spilled", 0), int):
            raise ValueError("the saved memory lacks its counts of dropped and spilled tokens")

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Take over a checked state. The file it names must hold, first, the records it had
        (checked by SHA-256; longer is cut back, as after a rollback); a file missing or altered
        is a warning, and the session goes on with the RAM part alone."""
        self._pieces = [(arrays["ids"].astype(np.int32), arrays["indices"].astype(np.int64))]
        self.copy_indices = arrays["copy_indices"].astype(np.int64)
        self.copy_of = arrays["copy_of"].astype(np.int64)
        self.dropped = meta["dropped"]
        spilled, spill = meta.get("spilled", 0), meta.get("spill")
        self.spilled, self._digest = 0, hashlib.sha256()
        if spill is not None:
            self.spill = Path(spill)
        if not spilled:
            return
        digest, problem = hashlib.sha256(), None
        try:
            with open(spill, "rb") as f:
                for done in range(0, spilled, 1 << 20):
                    block = f.read(min(1 << 20, spilled - done) * RECORD.itemsize)
                    digest.update(block)
            if digest.hexdigest() != meta.get("sha256"):
                problem = "it is shorter than saved or was altered"
        except OSError as exc:
            problem = str(exc)
        if problem is not None:
            warnings.warn(f"the memory file {spill} does not hold what was saved ({problem}): the session goes on "
                          f"without its {spilled:,} oldest tokens", stacklevel=3)
            self.dropped += spilled
            return
        self.spilled, self._digest = spilled, digest
