"""A GGUF model loaded by llama.cpp: weights, vocabulary, chat template. Contexts share it."""
from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path
from typing import Sequence

from llama_cpp import llama_cpp as llama

from ..model_files import diagnose_gguf, resolve_model
from . import ggml
from .closing import Closing
from .log import LOG

_process_ready = False


def init_process() -> None:
    """Initialise llama.cpp's backends and route its log through `LOG`, once per process. Called
    when the first model loads, never at import: importing the package changes nothing."""
    global _process_ready
    if not _process_ready:
        llama.llama_backend_init()
        LOG.install()
        ggml.install_abort_hook()
        _process_ready = True


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can put layers on a GPU of this machine."""
    return ggml.local_gpus() > 0


def system_info() -> str:
    """llama.cpp's build and CPU feature summary."""
    return llama.llama_print_system_info().decode()


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """HOST:PORT of an rpc-server, checked; ValueError says what is wrong."""
    host, sep, port = endpoint.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"an RPC server is HOST:PORT (e.g. 127.0.0.1:50052), not {endpoint!r}")
    return host, int(port)


def rpc_devices(endpoints: Sequence[str], timeout: float = 5.0) -> list[int]:
    """The llama.cpp devices of the rpc-servers at `endpoints` (HOST:PORT each), in that order.
    Each is reached first with a plain TCP connection, so that a wrong address is a ValueError
    naming it, not ggml's abort. The devices are not registered process-wide: only the models
    given them use them."""
    if not ggml.rpc_available():
        ggml.ggml_backend_rpc_add_server(b"")  # raises: this build has no RPC backend
    devices = []
    for endpoint in endpoints:
        host, port = parse_endpoint(endpoint)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            raise ValueError(f"no rpc-server answers at {endpoint} ({exc.strerror or exc}): start one with "
                             f"`infmllm-gguf rpc-server --host {host} --port {port}`") from None
        init_process()
        reg = ggml.ggml_backend_rpc_add_server(f"{host}:{port}".encode())
        devices += [ggml.ggml_backend_reg_dev_get(reg, i) for i in range(ggml.ggml_backend_reg_dev_count(reg))]
    return devices


class Model(Closing):
    """The weights and vocabulary of one GGUF file, in memory once; any number of `Runtime`
    contexts decode with it. `n_gpu_layers`: layers offloaded to the GPU (-1: all). `rpc`:
    rpc-servers (HOST:PORT each) that hold the offloaded layers instead of local GPUs, split
    among them by their free memory, as llama.cpp's `--rpc` does."""

    def __init__(self, path: str | os.PathLike | None = None, *, n_gpu_layers: int = -1,
                 rpc: Sequence[str] = ()):
        self.path: Path = resolve_model(path)
        self.n_gpu_layers = n_gpu_layers
        self.rpc = tuple(rpc)
        init_process()
        params = llama.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        if self.rpc:
            devices = rpc_devices(self.rpc)
            self._devices = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)  # NULL-terminated, kept alive
            params.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        LOG.pop_errors()
        self.ptr = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            diagnose_gguf(self.path, LOG.pop_errors())
        self.vocab = llama.llama_model_get_vocab(self.ptr)
        self.n_layer = llama.llama_model_n_layer(self.ptr)
        self.n_head = llama.llama_model_n_head(self.ptr)
        self.n_embd = llama.llama_model_n_embd(self.ptr)
        self.n_embd_inp = llama.llama_model_n_embd_inp(self.ptr)  # what an input embedding holds
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama.llama_model_n_ctx_train(self.ptr)
        self.sliding_window = llama.llama_model_n_swa(self.ptr)  # 0: none
        self.architecture = self.metadata("general.architecture") or "unknown"
        self.is_hybrid = bool(llama.llama_model_is_hybrid(self.ptr))  # attention layers beside recurrent ones
        self.rope_type = llama.llama_model_rope_type(self.ptr)  # llama.cpp's LLAMA_ROPE_TYPE_*
        # multi-head latent attention (DeepSeek-V2/V3): keys stored compressed, RoPE on a part of them
        self.mla = self.metadata(f"{self.architecture}.attention.kv_lora_rank") is not None
        self._jinja: dict[bool, object] | None = None  # render_chat_jinja's formatters, made at first use

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def multi_axis_rope(self) -> bool:
        """Whether positions have several axes (M-RoPE: time, height, width), as Qwen2-VL's and later."""
        return self.rope_type in (llama.LLAMA_ROPE_TYPE_MROPE, llama.LLAMA_ROPE_TYPE_IMROPE)

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None if the file has no such key."""
        buf = ctypes.create_string_buffer(256)
        n = llama.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama.llama_model_free(self.ptr)
            self.ptr = None


    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; `add_special` adds BOS (where the model has one)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama.llama_token * cap)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            buf = (llama.llama_token * -n)()
            n = llama.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes token `token` stands for (special tokens as their text). A character of
        several bytes may be split across tokens: decode a sequence with `StreamingDetokenizer`."""
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    @property
    def bos_token(self) -> int:
        """The beginning-of-sequence token's id (-1: none)."""
        return int(llama.llama_vocab_bos(self.vocab))

    @property
    def eos_token(self) -> int:
        """The end-of-sequence token's id (-1: none)."""
        return int(llama.llama_vocab_eos(self.vocab))

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    # -- chat -------------------------------------------------------------------------------
    def chat_template(self) -> str | None:
        """The model's own chat template (GGUF metadata), None if it has none."""
        template = llama.llama_model_chat_template(self.ptr, None)
        return template.decode("utf-8") if template else None

    def render_chat(self, messages: Sequence[tuple[str, str]], add_assistant: bool) -> str:
        """`messages` ((role, content) pairs) through the model's chat template, as llama.cpp
        renders it; `add_assistant` opens the assistant's turn at the end."""
        template = self.chat_template()
        if template is None:
            raise ValueError(f"{self.name} has no chat template; use generate() instead")
        encoded = [(role.encode(), content.encode()) for role, content in messages]
        arr = (llama.llama_chat_message * len(encoded))(*[llama.llama_chat_message(r, c) for r, c in encoded])
        size = 2 * sum(len(r) + len(c) for r, c in encoded) + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama.llama_chat_apply_template(template.encode(), arr, len(encoded), add_assistant, buf, size)
            if n < 0:
                raise ValueError("llama.cpp does not support this model's chat template")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n
        raise RuntimeError("chat template output kept growing")

    def render_chat_jinja(self, messages: Sequence[tuple[str, str]], add_assistant: bool,
                          tools: list[dict] | None = None) -> str:
        """`render_chat` as llama-cpp-python's `Llama` renders a chat: the template run by jinja2
        (its formatter, with the model's BOS and EOS texts), whatever llama.cpp's own engine, which
        knows a fixed set of templates by their look, leaves out (SmolLM2's default system message);
        `tools` (OpenAI's tool dicts) go to the template, for those that render them."""
        if self._jinja is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            def text(token: int) -> str:
                return self.token_bytes(token).decode("utf-8", errors="ignore") if token >= 0 else ""
            template = self.chat_template()
            if template is None:
                raise ValueError(f"{self.name} has no chat template; use generate() instead")
            self._jinja = {opens: Jinja2ChatFormatter(template, eos_token=text(self.eos_token),
                                                      bos_token=text(self.bos_token), add_generation_prompt=opens)
                           for opens in (False, True)}
        return self._jinja[add_assistant](messages=[{"role": r, "content": c} for r, c in messages], tools=tools).prompt
