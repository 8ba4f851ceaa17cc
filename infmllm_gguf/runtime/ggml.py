"""ctypes mirror of the few ggml functions that llama-cpp-python does not bind: the RPC backend's
devices (`ggml-rpc.h`, `ggml-backend.h`), ggml's abort hook (`ggml.h`), and what an eval callback
reads of a tensor (its name, shape and data).

As in `native`, each binding carries its C prototype as a comment. The libraries are those that
llama-cpp-python loaded (the `lib` folder beside its package); `make setup` builds them with
`-DGGML_RPC=ON`, so `libggml-rpc` is there. They are opened (with `RTLD_GLOBAL`) at the first
call of a binding that needs them, not at import.
"""
from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from llama_cpp import llama_cpp as llama

__all__ = ["ggml_abort_callback_t", "ggml_set_abort_callback", "ggml_backend_rpc_add_server",
           "ggml_backend_reg_dev_count", "ggml_backend_reg_dev_get", "ggml_backend_dev_name", "local_gpus",
           "rpc_available", "ggml_get_name", "ggml_backend_tensor_get", "tensor_shape", "tensor_reader"]

_LIB_DIR = Path(llama._lib._name).parent


class _Library:
    """A ggml library, opened on first use (not at import), by the name libllama links (its
    SONAME, lib*.so.0): the wheel holds lib*.so as a copy, not a link, and loading that one would
    give a second ggml with state of its own."""

    def __init__(self, name: str):
        self.name = name

    @functools.cached_property
    def cdll(self) -> ctypes.CDLL | None:
        for path in (_LIB_DIR / f"lib{self.name}.so.0", _LIB_DIR / f"lib{self.name}.so"):
            if path.exists():
                return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        return None


_BASE, _REGISTRY, _RPC = _Library("ggml-base"), _Library("ggml"), _Library("ggml-rpc")


def _binding(library: _Library, name: str, argtypes: list, restype):
    """The C function `name` of `library`, looked up and typed at its first call."""
    @functools.cache
    def function():
        if library.cdll is None:
            raise RuntimeError(f"this llama.cpp build ({_LIB_DIR}) has no lib{library.name}: run `make setup`, "
                               "which builds it (the RPC backend with -DGGML_RPC=ON)")
        fn = getattr(library.cdll, name)
        fn.argtypes, fn.restype = argtypes, restype
        return fn

    def call(*args):
        return function()(*args)
    call.__name__ = name
    return call


ggml_backend_reg_t = ctypes.c_void_p
ggml_backend_dev_t = ctypes.c_void_p

# typedef void (*ggml_abort_callback_t)(const char * error_message);
ggml_abort_callback_t = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

# GGML_API ggml_abort_callback_t ggml_set_abort_callback(ggml_abort_callback_t callback);
ggml_set_abort_callback = _binding(_BASE, "ggml_set_abort_callback", [ggml_abort_callback_t], ctypes.c_void_p)

# GGML_API size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg);
ggml_backend_reg_dev_count = _binding(_BASE, "ggml_backend_reg_dev_count", [ggml_backend_reg_t], ctypes.c_size_t)

# GGML_API ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index);
ggml_backend_reg_dev_get = _binding(_BASE, "ggml_backend_reg_dev_get", [ggml_backend_reg_t, ctypes.c_size_t],
                                    ggml_backend_dev_t)

# GGML_API const char * ggml_backend_dev_name(ggml_backend_dev_t device);
ggml_backend_dev_name = _binding(_BASE, "ggml_backend_dev_name", [ggml_backend_dev_t], ctypes.c_char_p)

# GGML_API size_t ggml_backend_dev_count(void);
ggml_backend_dev_count = _binding(_REGISTRY, "ggml_backend_dev_count", [], ctypes.c_size_t)

# GGML_API ggml_backend_dev_t ggml_backend_dev_get(size_t index);
ggml_backend_dev_get = _binding(_REGISTRY, "ggml_backend_dev_get", [ctypes.c_size_t], ggml_backend_dev_t)

# GGML_API enum ggml_backend_dev_type ggml_backend_dev_type(ggml_backend_dev_t device);
ggml_backend_dev_type = _binding(_BASE, "ggml_backend_dev_type", [ggml_backend_dev_t], ctypes.c_int)

# GGML_BACKEND_API ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);
ggml_backend_rpc_add_server = _binding(_RPC, "ggml_backend_rpc_add_server", [ctypes.c_char_p], ggml_backend_reg_t)

# enum ggml_backend_dev_type: CPU, GPU, IGPU, ACCEL, ...
GGML_BACKEND_DEVICE_TYPE_GPU = 1
GGML_BACKEND_DEVICE_TYPE_IGPU = 2


def local_gpus() -> int:
    """GPUs of this machine that llama.cpp can use (RPC servers are not registered, so not counted:
    llama_supports_gpu_offload says yes for any build with the RPC backend)."""
    types = (ggml_backend_dev_type(ggml_backend_dev_get(i)) for i in range(ggml_backend_dev_count()))
    return sum(t in (GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU) for t in types)


def rpc_available() -> bool:
    """Whether this llama.cpp build has the RPC backend (`make setup` builds it)."""
    return _RPC.cdll is not None


def _exit_on_abort(message: bytes) -> None:
    """ggml aborts the process on errors it cannot return (a lost RPC server among them): say why in
    one line, without the native backtrace, and exit with status 3 instead of dumping core."""
    text = message.decode("utf-8", errors="replace").strip()
    hint = ""
    if "RPC" in text or "connect" in text:
        hint = (" (an rpc-server stopped answering or could not be reached: llama.cpp cannot continue a stream "
                "whose layers it lost; restart the servers and the command)")
    os.write(2, f"error: llama.cpp stopped: {text}{hint}\n".encode())
    os._exit(3)


_ABORT_HOOK = ggml_abort_callback_t(_exit_on_abort)  # referenced here: C keeps only the pointer


def install_abort_hook() -> None:
    ggml_set_abort_callback(_ABORT_HOOK)


ggml_tensor_p = ctypes.c_void_p

# GGML_API const char * ggml_get_name(const struct ggml_tensor * tensor);
ggml_get_name = _binding(_BASE, "ggml_get_name", [ggml_tensor_p], ctypes.c_char_p)

# GGML_API void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
ggml_backend_tensor_get = _binding(_BASE, "ggml_backend_tensor_get",
                                   [ggml_tensor_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None)

GGML_TYPE_F32 = 0


def tensor_shape(tensor: int) -> tuple[int, tuple[int, ...]]:
    """(type, ne[4]) of a `struct ggml_tensor *`, read from the struct: { enum ggml_type type;
    struct ggml_backend_buffer * buffer; int64_t ne[4]; ... } (type at 0, ne at 16 on 64-bit)."""
    return ctypes.c_int32.from_address(tensor).value, tuple((ctypes.c_int64 * 4).from_address(tensor + 16))


def tensor_reader(name: str, receive: Callable[[np.ndarray], None], *, stop: bool = False):
    """An eval callback for a context (`Runtime(eval_callback=...)`) that hands `receive` each
    value of the 2-D float32 tensor `name` that a forward pass computes ([rows, ne0]: one row per
    token of the batch for a layer's output). With `stop`, the pass ends there: llama.cpp stops
    computing a graph when the callback returns false. The caller keeps the callback alive."""
    wanted = name.encode()

    def see(tensor: int, ask: bool, _user) -> bool:
        if ggml_get_name(tensor) != wanted:
            return not ask  # not wanted; when shown anyway, go on
        if ask:
            return True
        kind, ne = tensor_shape(tensor)
        if kind == GGML_TYPE_F32 and ne[2] == ne[3] == 1:
            data = np.empty((ne[1], ne[0]), dtype=np.float32)
            ggml_backend_tensor_get(tensor, data.ctypes.data, 0, data.nbytes)
            try:
                receive(data)
            except Exception as exc:  # an exception cannot cross llama.cpp: say it, and let the pass go on
                warnings.warn(f"reading {name} failed: {exc!r}", stacklevel=1)
                return True
        return not stop

    return llama.ggml_backend_sched_eval_callback(see)
