"""The save format of a stream: one .npz file with a JSON header and each component's state.

Each component of a session gives and takes its own state as (JSON-able metadata, NumPy arrays),
as mlx-lm's caches do: the runtime (llama.cpp's cells and the last logits), the cache controller
(stream indices, image flags, scores, counters), the chat transcript and the sampler. This module
only writes and reads them; `StreamSession` checks every component before it applies any.

Compatibility: a component reads the fields it knows and fills those a file lacks with their
defaults (a counter or an option added later does not make older files unreadable), so
`STATE_VERSION` changes only when an existing field changes meaning; a file of a newer version
is refused with a message saying so.
"""
from __future__ import annotations

import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

STATE_VERSION = 2  # 1: the single-file format before the session was split into components

#: what NumPy's reader raises for a file that is not a whole .npz of ours: cut (BadZipFile,
#: EOFError), altered (a bad CRC, NotImplementedError for a flipped compression field), not JSON
UNREADABLE = (ValueError, OSError, KeyError, EOFError, NotImplementedError, zipfile.BadZipFile, json.JSONDecodeError)

#: a component's state: JSON-able metadata and named arrays
ComponentState = tuple[dict, dict[str, np.ndarray]]


def write_state(path: str | os.PathLike, header: dict, components: dict[str, ComponentState]) -> Path:
    """Write `header` and the `components` to `path`, replaced atomically and durably: a crash
    mid-save leaves the previous file intact, and the new one is on disk when this returns."""
    path = Path(path)
    meta = {"version": STATE_VERSION, **header, "components": {name: m for name, (m, _) in components.items()}}
    arrays = {f"{name}.{key}": value for name, (_, named) in components.items() for key, value in named.items()}
    with replacing(path) as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return path


@contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A file to write that replaces `path` when the block ends, atomically and durably: a crash
    leaves the old file or the new one, whole, and the new one is on disk once the block is done."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)  # the rename itself


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checked_header(path: Path, meta) -> dict:
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a session saved by infmllm-gguf (its header is not a record)")
    version = meta.get("version")
    if isinstance(version, int) and version > STATE_VERSION:
        raise ValueError(f"{path} was saved by a newer infmllm-gguf (state format {version}; this one reads up to "
                         f"{STATE_VERSION}): upgrade to continue it")
    if version != STATE_VERSION:
        raise ValueError(f"{path} was saved in state format {version}, from before this format: this version "
                         f"reads format {STATE_VERSION}")
    return meta


def read_header(path: str | os.PathLike) -> dict:
    """The header of a file from `write_state` (its arrays are not read)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"no saved session at {path}") from None
    except UNREADABLE as exc:
        raise ValueError(f"{path} is not a session saved by infmllm-gguf ({exc})") from None
    return _checked_header(path, meta)


def read_state(path: str | os.PathLike) -> tuple[dict, dict[str, ComponentState]]:
    """The header and the components' states of a file from `write_state`; FileNotFoundError or
    ValueError saying why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved session at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes())
    except UNREADABLE as exc:
        raise ValueError(f"{path} is not a session saved by infmllm-gguf ({exc})") from None
    _checked_header(path, meta)
    if not isinstance(meta.get("components"), dict):
        raise ValueError(f"{path} holds no component states")
    components = {name: (m, {}) for name, m in meta.pop("components").items()}
    for key, value in arrays.items():
        name, _, array = key.partition(".")
        if name not in components:
            raise ValueError(f"{path} holds arrays of an unknown component {name!r}")
        components[name][1][array] = value
    return meta, components
