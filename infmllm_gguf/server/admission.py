"""Admission: at most `parallel` requests work at once, `queue` more wait for a slot, and beyond
those the server answers 503 at once (`Busy`)."""
from __future__ import annotations

import threading


class Busy(Exception):
    """Every slot and the queue are taken."""


class Admission:
    def __init__(self, parallel: int, queue: int):
        self.parallel, self.queue = parallel, queue
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(parallel)
        self._admitted = 0

    def admit(self) -> None:
        """Take a place among `parallel + queue`, or raise Busy."""
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

    def slot(self) -> threading.Semaphore:
        """Held while a request works (`with admission.slot(): ...`)."""
        return self._slots
