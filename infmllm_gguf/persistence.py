"""Saving and continuing a `StreamSession`: every part of the session (`state.Part`) gives and takes
its own state; snapshot, rollback, save and load are loops over them (`parts`), the file's checks
and compatibility reading are `state`'s. A part of `StreamSession` (its base class), which gives
`model`, `runtime`, `cache`, `transcript`, `rng`, `memory` and the settings.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Self, Sequence

from .memory import MemoryConfig
from .runtime import Model
from .state import (Part, RandomState, check_saved_with, known_settings, load_parts, read_header, read_state,
                    return_freed_memory, saved_policy, snapshot, write_state)


class Persistence:
    """The state methods of `StreamSession`."""

    def _identity(self) -> dict:
        m = self.model
        return {"model": m.name, "model_bytes": m.path.stat().st_size, "n_vocab": m.n_vocab,
                "n_layer": m.n_layer, "n_embd": m.n_embd, "n_ctx": self.runtime.n_ctx}

    def _settings(self) -> dict:
        return {"policy": self.policy.config(), "chunk": self.chunk,
                "generation_headroom": self.generation_headroom, "flash_attn": self.flash_attn,
                "cache_type_k": self.cache_types[0], "cache_type_v": self.cache_types[1],
                "memory": None if self.memory is None else self.memory.config.config()}

    def parts(self) -> dict[str, Part]:
        """The parts whose states make the stream's, in the order they are loaded: llama.cpp's cells
        and logits, the controller's bookkeeping, the chat transcript, the sampler, the memory."""
        parts = {"runtime": self.runtime, "cache": self.cache, "chat": self.transcript,
                 "sampler": RandomState(self.rng)}
        return parts if self.memory is None else {**parts, "memory": self.memory}

    def snapshot(self) -> dict:
        """The whole stream state, in memory: `rollback(snapshot)` puts this session back to it
        exactly (the recall benchmark asks every question from the same state). Holds a copy of
        the cells: `sequence_bytes()` bytes."""
        return snapshot(self.parts())

    def rollback(self, snapshot: dict) -> None:
        """Return to a state that `snapshot()` took in this session (no checks: it fits)."""
        for name, part in self.parts().items():
            part.load_state(*snapshot[name])  # each copies what it keeps

    def save(self, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Write the whole stream state to `path` (an .npz file): every part's (`parts`), so that
        `restore` continues exactly. `extra` is JSON-able data of the caller's (a run's progress),
        returned by `load`. The file is replaced atomically."""
        components = {name: part.state() for name, part in self.parts().items()}
        if self.memory is not None:
            self.memory.named_by_save()
        path = write_state(path, {"identity": self._identity(), "settings": self._settings(), "extra": extra or {}},
                           components)
        del components  # the copies go before the trim, or their pages stay
        return_freed_memory()
        return path

    def load(self, path: str | os.PathLike) -> dict:
        """Continue the stream saved at `path` in this session (same model, policy and sizes);
        returns the `extra` data saved with it. Everything is checked before anything changes: a
        file that does not fit leaves the session as it was."""
        header, components = read_state(path)
        check_saved_with(path, header, self._identity(), self._settings(),
                         {"memory": lambda saved: MemoryConfig.from_config(saved).config()})

        def cells_agree(saved: dict) -> None:
            n_runtime, n_cache = saved["runtime"][0]["n_cells"], saved["cache"][1]["stream_indices"].size
            if n_runtime != n_cache:
                raise ValueError(f"{path}: llama.cpp's saved cells ({n_runtime}) and the stream's ({n_cache}) "
                                 "do not match")
        load_parts(path, self.parts(), components, optional=["memory"], agree=cells_agree)
        del components  # the file's copies go before the trim, or their pages stay
        return_freed_memory()
        return header.get("extra", {})

    @classmethod
    def restore(cls, path: str | os.PathLike, model: Model | str | os.PathLike | None = None, *,
                n_gpu_layers: int = -1, n_threads: int | None = None,
                mmproj: str | os.PathLike | None = None, view_tokens: int = 0,
                rpc: Sequence[str] = ()) -> Self:
        """A new session continuing the stream saved at `path`, with the settings it was saved with
        (`mmproj` to go on feeding images; the images already in the stream need none). Files saved
        before the cache types were settings ran with f16."""
        settings = known_settings(path, read_header(path).get("settings", {}), inspect.signature(cls).parameters)
        policy = saved_policy(path, settings.pop("policy"))
        session = cls(model, policy, n_gpu_layers=n_gpu_layers, n_threads=n_threads, mmproj=mmproj,
                      view_tokens=view_tokens, rpc=rpc, **settings)
        try:
            session.load(path)
        except Exception:
            session.close()
            raise
        return session
