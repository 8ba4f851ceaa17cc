"""`Closing`: what every owner of llama.cpp memory (a model, a context, a sampler chain) shares: a
context manager that calls its `close()`, which also runs when it is collected unclosed (scripts
leave closing to the collector, as llama-cpp-python's do). `close()` must be safe to call twice and
on a half-made object (a constructor that failed)."""
from __future__ import annotations

from typing import Self


class Closing:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
