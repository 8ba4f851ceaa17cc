"""One GGUF writer for the zoo's architectures: metadata as a dict, tensors as specs.

A spec is ``(name, numpy shape, init)``: numpy shape ``(rows, cols)`` is ggml's ``{ne0 = cols,
ne1 = rows}`` (cols is the fan-in); init is a float (normal with that std; 0.0 means a norm weight
of ones, as in `synthetic`) or ``("fill", value)`` (every element `value`, f32: SSM decay terms,
biases that must not be random). The tokenizer is `synthetic`'s SentencePiece-style one, which
llama.cpp reads whatever the architecture.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from ..synthetic import _make_tensor, _nbytes, _qtype, add_tokenizer

Init = Union[float, tuple]
Spec = tuple[str, tuple[int, ...], Init]


def matrix(name: str, rows: int, cols: int) -> Spec:
    """A weight matrix of fan-in `cols`: normal with std 1/sqrt(fan-in)."""
    return (name, (rows, cols), 1.0 / float(np.sqrt(cols)))


def norm(name: str, n: int) -> Spec:
    """A norm weight: ones."""
    return (name, (n,), 0.0)


def fill(name: str, shape: tuple[int, ...], value: float) -> Spec:
    """Every element `value` (f32)."""
    return (name, shape, ("fill", value))


def _add(w, key: str, value) -> None:
    """One metadata entry, its GGUF type chosen from the Python value."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        (w.add_uint32 if value >= 0 else w.add_int32)(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(f"{key}: cannot write a {type(value).__name__}")


def _data(shape: tuple[int, ...], init: Init, dtype: str, rng: np.random.Generator):
    """The tensor's bytes and its GGML type."""
    from gguf import GGMLQuantizationType as T

    if isinstance(init, tuple):
        kind, value = init
        if kind != "fill":
            raise ValueError(f"unknown init {init!r}")
        return np.full(shape, value, dtype=np.float32), T.F32
    qt = _qtype(dtype, shape)
    return _make_tensor(shape, float(init), qt, rng), qt


def write_gguf(path: Union[str, Path], arch: str, metadata: dict, specs: list[Spec], *,
               n_vocab: int, dtype: str = "f32", seed: int = 0, name: str = "zoo") -> Path:
    """Write a GGUF of architecture `arch`: `metadata` keys are written as given (``"{arch}."``
    is put before a key that starts with a dot), then the tokenizer, then the tensors."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_type("model")
    for key, value in metadata.items():
        _add(w, arch + key if key.startswith(".") else key, value)
    add_tokenizer(w, n_vocab)

    tensors = [_data(shape, init, dtype, np.random.default_rng([seed, i]))
               for i, (_, shape, init) in enumerate(specs)]
    for (tname, shape, _), (_, qt) in zip(specs, tensors):
        w.add_tensor_info(tname, shape, np.dtype(np.float32), _nbytes(shape, qt), raw_dtype=qt)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for data, _ in tensors:
            w.write_tensor_data(data)
        w.flush()
    finally:
        w.close()
    return path
