"""The save format of a stream: one .npz file with a JSON header and each component's state.

Each component of a session gives and takes its own state as (JSON-able metadata, NumPy arrays),
as mlx-lm's caches do: the runtime (llama.cpp's cells and the last logits), the cache controller
(stream indices, image flags, scores, counters), the chat transcript and the sampler. This module
writes and reads them, and gives a session's parts their states (`load_parts`: every part
checked before any is applied).

Compatibility: a component reads the fields it knows and fills those a file lacks with their
defaults (a counter or an option added later does not make older files unreadable), so
`STATE_VERSION` changes only when an existing field changes meaning; a file of a newer version
is refused with a message saying so.
"""
from __future__ import annotations

import copy
import ctypes
import json
import os
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Protocol

import numpy as np

from .policies import Policy, from_config

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


# -- the session's parts --------------------------------------------------------------------
class Part(Protocol):
    """A component of a session that gives and takes back its own state: the runtime, the cache
    controller, the chat transcript, the sampler's random state, the memory."""

    def state(self) -> ComponentState: ...

    def check_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Raise ValueError unless the state fits this part; changes nothing."""

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None: ...


class RandomState:
    """A NumPy generator as a part (the sampler's seed and how far it has drawn)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def state(self) -> ComponentState:
        return {"rng": self.rng.bit_generator.state}, {}

    def check_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        try:
            np.random.default_rng().bit_generator.state = meta.get("rng")
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"the saved sampler state is not valid ({exc})") from None

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.rng.bit_generator.state = meta["rng"]


def snapshot(parts: dict[str, Part]) -> dict[str, ComponentState]:
    """Every part's state, copied (a part's fresh arrays, such as the runtime's cells, as they are)."""
    return {name: part.state() if name == "runtime" else copy.deepcopy(part.state()) for name, part in parts.items()}


def load_parts(path: str | os.PathLike, parts: dict[str, Part], components: dict[str, ComponentState], *,
               optional: Iterable[str] = (), agree: Callable[[dict[str, ComponentState]], None] = lambda c: None) -> None:
    """Give each part its saved state: every part is checked first (and `agree`, which checks the
    parts' states against each other), so that a file that does not fit changes nothing. A part in
    `optional` that the file lacks starts empty (`reset`), with a warning."""
    missing = set(parts) - set(components) - set(optional)
    if missing:
        raise ValueError(f"{path} lacks the state of {', '.join(sorted(missing))}")
    present = {name: part for name, part in parts.items() if name in components}
    for name, part in present.items():
        part.check_state(*components[name])
    agree(components)
    for name, part in parts.items():
        if name in present:
            part.load_state(*components[name])
        else:
            warnings.warn(f"{path} holds no {name}: this session's {name} starts empty", stacklevel=3)
            part.reset()


def return_freed_memory() -> None:
    """Hand the heap pages freed by a save or a load back to the OS. glibc keeps them, and a
    stream's resident size stepped up by 11-34 MiB at its first checkpoints (the copies of the
    state); with this it stays flat. A no-op where the C library is not glibc."""
    if _malloc_trim is not None:
        _malloc_trim(0)


try:  # glibc: see `return_freed_memory`
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


# -- settings -------------------------------------------------------------------------------
def saved_policy(path: str | os.PathLike, config: dict) -> Policy:
    """The policy of a saved file's record, options added since filled in as the file ran them."""
    try:
        return from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path} names a policy this version cannot build ({exc})") from None


def known_settings(path: str | os.PathLike, saved: dict, known: Iterable[str]) -> dict:
    """The settings of a saved file that this version knows (a newer version's additions are left
    out with a warning; those the file lacks take their defaults)."""
    known = set(known)
    unknown = sorted(set(saved) - known)
    if unknown:
        warnings.warn(f"{path} was saved with settings this version does not know ({', '.join(unknown)}): "
                      "they are ignored", stacklevel=3)
    if "policy" not in saved:
        raise ValueError(f"{path} names no policy")
    return {k: v for k, v in saved.items() if k in known}


def check_saved_with(path: str | os.PathLike, header: dict, identity: dict, settings: dict,
                     normalise: dict[str, Callable[[object], object]]) -> None:
    """Raise ValueError, naming each difference, unless the file was saved by the same model
    (`identity`) with the same `settings`; `normalise` brings a saved setting to this version's
    form (a policy's options added since, with the values the file ran with)."""
    saved_settings = known_settings(path, header.get("settings", {}), settings)
    saved_settings["policy"] = saved_policy(path, saved_settings["policy"]).config()
    for name, fill in normalise.items():
        if saved_settings.get(name):
            saved_settings[name] = fill(saved_settings[name])
    for what, mine, saved in (("identity", identity, header.get("identity", {})), ("settings", settings, saved_settings)):
        diff = {k: (v, mine.get(k)) for k, v in saved.items() if mine.get(k) != v}
        if diff:
            raise ValueError(f"{path} was saved with other {what}: " +
                             ", ".join(f"{k}={saved!r} (here {here!r})" for k, (saved, here) in diff.items()))
