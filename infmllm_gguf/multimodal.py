"""Images in the stream: libmtmd encodes them, the cache controller decodes and evicts them.

`Projector` wraps an mtmd context (a vision projector, "mmproj", loaded for one text model). An
image becomes mtmd's chunks: the model's own image markers as text tokens (e.g. Gemma 3's
``<start_of_image>``; none for LLaVA) and the image's embeddings. `feed_image` decodes both
through the session's `CacheController`, in chunks like text, so the image tokens get attention
scores, compete with text for the budget and are evicted by the same policy.

Not supported: models whose image tokens need M-RoPE positions (Qwen2-VL family). Their tokens
take several position components each and fewer positions than tokens, which the controller's
one-position-per-cell bookkeeping does not express; `Projector` refuses them with a clear error.
"""
from __future__ import annotations

import ctypes
import io
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Union

import numpy as np
from llama_cpp import llama_cpp as llama
from llama_cpp import mtmd_cpp as mtmd
from PIL import Image, UnidentifiedImageError

from .models import ModelError, check_gguf
from .native_log import LOG
from .runtime import Runtime

if TYPE_CHECKING:
    from .session import StreamSession

#: an image as `feed_image` takes it: a file path, the file's bytes, or a PIL image
ImageLike = Union[str, os.PathLike, bytes, Image.Image]
#: what a stream of media holds: text (timestamps, captions) and images, in order
MediaPart = Union[str, ImageLike]

MEDIA_MARKER = mtmd.mtmd_default_marker().decode()
mtmd.mtmd_log_set(LOG.callback, None)
mtmd.mtmd_helper_log_set(LOG.callback, None)


class ProjectorError(ValueError):
    """An mmproj file that cannot serve this model."""


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, bytes or a PIL image; ValueError naming what failed."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    what = "the image bytes" if isinstance(image, bytes) else str(image)
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image not found: {what}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # PIL's ways of saying "not an image"
        raise ValueError(f"cannot decode {what} as an image ({exc})") from None


@dataclass(frozen=True)
class TextPiece:
    tokens: list[int]


@dataclass(frozen=True)
class ImagePiece:
    embeddings: np.ndarray  # float32 [n_tokens, n_embd]
    non_causal: bool        # the model attends over the whole image at once (Gemma 3)


class Projector:
    """A vision projector (mmproj GGUF) loaded through libmtmd for the model of `runtime`."""

    def __init__(self, path: str | os.PathLike, runtime: Runtime, *, use_gpu: bool = True,
                 n_threads: int | None = None):
        self.path = Path(path)
        try:
            check_gguf(self.path)
        except ModelError as exc:
            raise ProjectorError(f"mmproj: {exc}") from None
        self.n_embd = runtime.n_embd_inp
        self._check_metadata()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads or max(1, os.cpu_count() or 1)
        params.print_timings = False
        LOG.take()
        self.ctx = mtmd.mtmd_init_from_file(str(self.path).encode(), runtime.model, params)
        if not self.ctx:
            raise ProjectorError(f"libmtmd could not load {self.path} for {runtime.model_path.name}: "
                                 f"{LOG.take() or 'no reason given'}")
        if not mtmd.mtmd_support_vision(self.ctx):
            self.close()
            raise ProjectorError(f"{self.path} has no vision encoder (an audio-only projector?)")
        if mtmd.mtmd_decode_use_mrope(self.ctx):
            self.close()
            raise ProjectorError(f"{runtime.model_path.name} places image tokens with M-RoPE (Qwen2-VL family), "
                                 "which the bounded cache does not support yet")
        self.n_ubatch = llama.llama_n_ubatch(runtime.ctx)

    def _check_metadata(self) -> None:
        """Catch the common wrong-file cases from the GGUF metadata, before libmtmd reads tensors."""
        from gguf import GGUFReader

        try:
            reader = GGUFReader(self.path)
        except Exception as exc:  # the reader raises several types on corrupt input
            raise ProjectorError(f"{self.path} is not a readable GGUF file ({exc})") from None
        arch = reader.get_field("general.architecture")
        arch = arch.contents() if arch is not None else None
        if arch != "clip":
            raise ProjectorError(f"{self.path} is not a multimodal projector (architecture {arch!r}, expected "
                                 "'clip'): pass the mmproj-*.gguf file that comes with the model")
        dim = reader.get_field("clip.vision.projection_dim")
        if dim is not None and int(dim.contents()) != self.n_embd:
            raise ProjectorError(f"{self.path.name} projects images to {int(dim.contents())} values but the model "
                                 f"embeds tokens in {self.n_embd}: this mmproj belongs to another model")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            mtmd.mtmd_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        self.close()

    def encode(self, image: ImageLike, *, add_special: bool = False) -> list[TextPiece | ImagePiece]:
        """The pieces of one image as the model reads it: marker tokens and embeddings, in order."""
        rgb = np.ascontiguousarray(load_image(image), dtype=np.uint8)
        bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            if not bitmap or not chunks:
                raise MemoryError("libmtmd could not allocate an image")
            marker = MEDIA_MARKER.encode()
            text = mtmd.mtmd_input_text(marker, len(marker), add_special, True)
            rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
            if rc != 0:
                raise ValueError(f"libmtmd could not tokenize the image (code {rc}): {LOG.take()}")
            return [self._piece(mtmd.mtmd_input_chunks_get(chunks, i))
                    for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        finally:
            if chunks:
                mtmd.mtmd_input_chunks_free(chunks)
            if bitmap:
                mtmd.mtmd_bitmap_free(bitmap)

    def _piece(self, chunk) -> TextPiece | ImagePiece:
        kind = mtmd.mtmd_input_chunk_get_type(chunk)
        if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            return TextPiece([ptr[i] for i in range(n.value)])
        if kind != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            raise ValueError(f"libmtmd gave a chunk of type {kind} for an image")
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        rc = mtmd.mtmd_encode_chunk(self.ctx, chunk)
        if rc != 0:
            raise RuntimeError(f"libmtmd failed to encode the image (code {rc}): {LOG.take()}")
        out = mtmd.mtmd_get_output_embd(self.ctx)
        embd = np.ctypeslib.as_array(out, shape=(n_tokens, self.n_embd)).copy()
        return ImagePiece(embd, bool(mtmd.mtmd_decode_use_non_causal(self.ctx, chunk)))


def feed_image(session: "StreamSession", image: ImageLike) -> int:
    """Append one image to the stream (with the model's image markers), evicting as needed;
    returns the number of image tokens fed."""
    if session.projector is None:
        raise ValueError("this session has no vision projector: pass mmproj=PATH (--mmproj) to use images")
    pieces = session.projector.encode(image, add_special=session.stats.tokens_seen == 0)
    # the tokens of a non-causal image attend to each other both ways: mtmd requires them in one
    # ubatch (checked before anything is fed)
    too_big = [len(p.embeddings) for p in pieces if isinstance(p, ImagePiece) and p.non_causal
               and len(p.embeddings) > min(session.chunk, session.projector.n_ubatch)]
    if too_big:
        raise ValueError(f"this model attends over a whole image at once: its {too_big[0]} tokens must fit in one "
                         f"batch; raise the chunk (--chunk) to at least {too_big[0]}")
    n_image = 0
    for piece in pieces:
        if isinstance(piece, TextPiece):
            session.feed_tokens(piece.tokens)
            continue
        embd, n = piece.embeddings, len(piece.embeddings)
        if not piece.non_causal:
            for i in range(0, n, session.chunk):
                session.cache.decode(embd[i:i + session.chunk])
        else:
            llama.llama_set_causal_attn(session.runtime.ctx, False)
            try:
                session.cache.decode(embd)
            finally:
                llama.llama_set_causal_attn(session.runtime.ctx, True)
        n_image += n
    return n_image


def peek(parts: Iterable[MediaPart]) -> Iterator[MediaPart]:
    """`parts` with its first item taken now, so that an empty or failing source (a video with no
    frames) raises before anything is fed."""
    it = iter(parts)
    first = next(it, None)
    if first is None:
        raise ValueError("no media to feed: the source gave no frames")
    return itertools.chain([first], it)


def feed_media(session: "StreamSession", parts: Iterable[MediaPart]) -> int:
    """Feed text and images in order (e.g. a timestamp before each video frame); returns the number
    of image tokens fed."""
    n_image = 0
    for part in parts:
        if isinstance(part, str):
            session.feed_text(part)
        else:
            n_image += feed_image(session, part)
    return n_image
