"""The save format of a stream: one .npz file with a JSON header and each component's state.

Each component of a session gives and takes its own state as (JSON-able metadata, NumPy arrays),
as mlx-lm's caches do: the runtime (llama.cpp's cells and the last logits), the cache controller
(stream indices, image flags, scores, counters), the chat transcript and the sampler. This module
only writes and reads them; `StreamSession` checks every component before it applies any.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

STATE_VERSION = 2

#: a component's state: JSON-able metadata and named arrays
ComponentState = tuple[dict, dict[str, np.ndarray]]


def write_state(path: str | os.PathLike, header: dict, components: dict[str, ComponentState]) -> Path:
    """Write `header` and the `components` to `path`, replaced atomically: a crash mid-save
    leaves the previous file intact."""
    path = Path(path)
    meta = {"version": STATE_VERSION, **header, "components": {name: m for name, (m, _) in components.items()}}
    arrays = {f"{name}.{key}": value for name, (_, named) in components.items() for key, value in named.items()}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    os.replace(tmp, path)
    return path


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
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a session saved by infmllm-gguf ({exc})") from None
    if not isinstance(meta, dict) or meta.get("version") != STATE_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise ValueError(f"{path} was saved in state format {version}, this version reads {STATE_VERSION}")
    if not isinstance(meta.get("components"), dict):
        raise ValueError(f"{path} holds no component states")
    components = {name: (m, {}) for name, m in meta.pop("components").items()}
    for key, value in arrays.items():
        name, _, array = key.partition(".")
        if name not in components:
            raise ValueError(f"{path} holds arrays of an unknown component {name!r}")
        components[name][1][array] = value
    return meta, components
