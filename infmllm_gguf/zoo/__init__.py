"""Small random-weight GGUFs of every architecture in the support matrix (README, "Architectures").

Each family module (`dense`, `hybrid`) maps an architecture name, as llama.cpp spells it in
`general.architecture`, to a builder returning ``(metadata, tensor specs, n_vocab)`` for
`_writer.write_gguf`. The shapes are tiny (a few layers, n_embd 64..128) so that the test matrix
runs every architecture through capture, eviction and re-indexing in seconds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from . import dense, hybrid
from ._writer import write_gguf

__all__ = ["ARCHITECTURES", "HYBRID", "write"]

#: llama and gemma3 come from `synthetic`'s tiny shapes; the others from the family modules
_SYNTHETIC_SHAPES = {"llama": "tiny-llama", "gemma3": "tiny-gemma3-swa"}
HYBRID: tuple[str, ...] = hybrid.ARCHS
ARCHITECTURES: tuple[str, ...] = tuple(_SYNTHETIC_SHAPES) + dense.ARCHS + hybrid.ARCHS


def write(path: Union[str, Path], arch: str, *, dtype: str = "f32", seed: int = 0) -> Path:
    """Write the zoo's model of `arch` to `path` (2-D tensors in `dtype`)."""
    if arch in _SYNTHETIC_SHAPES:
        from ..synthetic import write_model
        return write_model(path, _SYNTHETIC_SHAPES[arch], dtype=dtype, seed=seed)
    if arch in HYBRID:
        metadata, specs, n_vocab = hybrid.build(arch)
    elif arch in dense.ARCHS:
        metadata, specs, n_vocab = dense.build(arch)
    else:
        raise ValueError(f"the zoo has no {arch!r} model; it has {', '.join(ARCHITECTURES)}")
    return write_gguf(path, arch, metadata, specs, n_vocab=n_vocab, dtype=dtype, seed=seed)  # no arch in the name: llama.cpp keys vocabulary quirks on it

