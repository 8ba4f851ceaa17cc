"""One quiet log for llama.cpp and libmtmd.

llama.cpp logs every tensor it loads, and llama-cpp-python's own callback maps an older ggml
level enum, so its "errors only" lets warnings through. The callback here keeps the last error
lines, so that exceptions can say why a library failed, and writes the whole log to stderr only
with INFMLLM_GGUF_VERBOSE set. It is installed when the first model loads (`install`), and into
libmtmd when the first projector loads (`install_mtmd`), never at import.
"""
from __future__ import annotations

import os

from llama_cpp import llama_cpp as llama

# ggml.h of the pinned llama.cpp: enum ggml_log_level
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5  # continues the previous line's level


class NativeLog:
    """The log callback given to llama.cpp (and to libmtmd, which logs apart)."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self.errors: list[str] = []
        self.verbose = bool(os.environ.get("INFMLLM_GGUF_VERBOSE"))
        self._level = 0
        self.callback = llama.llama_log_callback(self._log)  # referenced here: C keeps only the pointer

    def _log(self, level: int, text: bytes, _user) -> None:
        if level != GGML_LOG_LEVEL_CONT:
            self._level = level
        if self._level == GGML_LOG_LEVEL_ERROR:
            message = text.decode("utf-8", errors="replace").strip()
            if message:
                self.errors = (self.errors + [message])[-self.keep:]
        if self.verbose:
            os.write(2, text)

    def install(self) -> None:
        llama.llama_log_set(self.callback, None)

    def install_mtmd(self, mtmd) -> None:
        """Also for libmtmd (`mtmd`: llama-cpp-python's mtmd_cpp module)."""
        mtmd.mtmd_log_set(self.callback, None)
        mtmd.mtmd_helper_log_set(self.callback, None)

    def pop_errors(self) -> str:
        """The error lines logged since the last call, joined; empty if none."""
        out, self.errors = " ".join(self.errors), []
        return out


LOG = NativeLog()
