"""libmtmd, llama.cpp's multimodal library: a vision projector (mmproj) that turns an image into
the model's marker tokens and image embeddings. `infmllm_gguf.multimodal` builds on it."""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from .log import LOG
from .model import Model


@dataclass(frozen=True)
class TextChunk:
    tokens: list[int]


@dataclass(frozen=True)
class ImageChunk:
    embeddings: np.ndarray  # float32 [n_tokens, n_embd_inp]
    non_causal: bool        # the model attends over the whole image at once (Gemma 3)
    # M-RoPE (Qwen2-VL and later): each token's (time, height, width, fourth) position offsets from
    # the image's first position, int [4, n_tokens], and the positions the image spans; None, 0 else
    layout: np.ndarray | None = None
    n_pos: int = 0


class VisionEncoderError(ValueError):
    """libmtmd cannot load or use this projector for the model."""


class VisionEncoder:
    """An mtmd context: the projector at `path`, loaded for `model`."""

    def __init__(self, path: str | os.PathLike, model: Model, *, use_gpu: bool = True, n_threads: int | None = None):
        from llama_cpp import mtmd_cpp as mtmd  # loads libmtmd: only sessions with images pay for it

        self._mtmd = mtmd
        LOG.install_mtmd(mtmd)
        self.n_embd = model.n_embd_inp
        self.marker = mtmd.mtmd_default_marker().decode()  # where a prompt's media go
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads or max(1, os.cpu_count() or 1)
        params.print_timings = False
        LOG.pop_errors()
        self.ctx = mtmd.mtmd_init_from_file(str(path).encode(), model.ptr, params)
        if not self.ctx:
            raise VisionEncoderError(f"libmtmd could not load {path} for {model.name}: "
                                     f"{LOG.pop_errors() or 'no reason given'}")
        self.supports_vision = bool(mtmd.mtmd_support_vision(self.ctx))
        self.uses_mrope = bool(mtmd.mtmd_decode_use_mrope(self.ctx))

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        self.close()

    def encode(self, rgb: np.ndarray, *, add_special: bool = False) -> list[TextChunk | ImageChunk]:
        """The chunks of one RGB image (uint8 [height, width, 3]) as the model reads it: marker
        tokens and embeddings, in order."""
        mtmd = self._mtmd
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            if not bitmap or not chunks:
                raise MemoryError("libmtmd could not allocate an image")
            marker = self.marker.encode()
            text = mtmd.mtmd_input_text(marker, len(marker), add_special, True)
            rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
            if rc != 0:
                raise ValueError(f"libmtmd could not tokenize the image (code {rc}): {LOG.pop_errors()}")
            return [self._chunk(mtmd.mtmd_input_chunks_get(chunks, i)) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        finally:
            if chunks:
                mtmd.mtmd_input_chunks_free(chunks)
            if bitmap:
                mtmd.mtmd_bitmap_free(bitmap)

    def _chunk(self, chunk) -> TextChunk | ImageChunk:
        mtmd = self._mtmd
        kind = mtmd.mtmd_input_chunk_get_type(chunk)
        if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            return TextChunk([ptr[i] for i in range(n.value)])
        if kind != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            raise ValueError(f"libmtmd gave a chunk of type {kind} for an image")
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        rc = mtmd.mtmd_encode_chunk(self.ctx, chunk)
        if rc != 0:
            raise RuntimeError(f"libmtmd failed to encode the image (code {rc}): {LOG.pop_errors()}")
        embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.ctx), shape=(n_tokens, self.n_embd)).copy()
        non_causal = bool(mtmd.mtmd_decode_use_non_causal(self.ctx, chunk))
        if not self.uses_mrope:
            return ImageChunk(embd, non_causal)
        image = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
        # libmtmd's own layout (mtmd_helper_decode_image_chunk's), taken at position 0
        layout = np.empty((4, n_tokens), dtype=np.int64)
        for i in range(n_tokens):
            p = mtmd.mtmd_image_tokens_get_decoder_pos(image, 0, i)
            layout[:, i] = (p.t, p.y, p.x, p.z)
        return ImageChunk(embd, non_causal, layout, int(mtmd.mtmd_input_chunk_get_n_pos(chunk)))
