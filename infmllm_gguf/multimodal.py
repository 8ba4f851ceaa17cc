"""Images in the stream: a vision projector encodes them, the cache controller decodes and evicts them.

`Projector` is a vision projector ("mmproj") for one text model, checked before libmtmd reads it.
An image becomes libmtmd's chunks: the model's own image markers as text tokens (e.g. Gemma 3's
``<start_of_image>``; none for LLaVA) and the image's embeddings. `StreamSession` decodes both
through its `CacheController`, in chunks like text, so the image tokens get attention scores,
compete with text for the budget and are evicted by the same policy.

Models whose image tokens take M-RoPE positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) get
libmtmd's layout (`ImageChunk.layout`): the cells of an image share its time position, span the
larger side of its grid, and are kept or evicted whole (`infmllm_gguf.layout`).
"""
from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .model_files import ModelError, check_gguf
from .runtime import Model
from .runtime.mtmd import ImageChunk, TextChunk, VisionEncoder, VisionEncoderError

#: an image as `feed_image` takes it: a file path, the file's bytes, or a PIL image
ImageLike = Union[str, os.PathLike, bytes, Image.Image]
#: what a stream of media holds: text (timestamps, captions) and images, in order
MediaPart = Union[str, ImageLike]

__all__ = ["ImageChunk", "ImageLike", "MediaPart", "Projector", "ProjectorError", "TextChunk", "load_image"]


def first_checked(parts: Iterable[MediaPart]) -> Iterator[MediaPart]:
    """`parts` with its first item taken now, so that an empty or failing source (a video with no
    frames) raises before anything is fed."""
    it = iter(parts)
    first = next(it, None)
    if first is None:
        raise ValueError("no media to feed: the source gave no frames")
    return itertools.chain([first], it)


class ProjectorError(ValueError):
    """An mmproj file that cannot serve this model."""


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, bytes or a PIL image; ValueError naming what failed."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, os.PathLike, bytes)):
        raise ValueError(f"an image is a path, the file's bytes or a PIL image, not a {type(image).__name__}")
    what = "the image bytes" if isinstance(image, bytes) else str(image)
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image not found: {what}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # PIL's ways of saying "not an image"
        raise ValueError(f"cannot decode {what} as an image ({exc})") from None


class Projector:
    """A vision projector (mmproj GGUF) for `model`, loaded through libmtmd."""

    def __init__(self, path: str | os.PathLike, model: Model, *, use_gpu: bool = True,
                 n_threads: int | None = None):
        self.path = Path(path)
        try:
            check_gguf(self.path)
        except ModelError as exc:
            raise ProjectorError(f"mmproj: {exc}") from None
        self.n_embd = model.n_embd_inp
        self._check_metadata()
        try:
            self.encoder = VisionEncoder(self.path, model, use_gpu=use_gpu, n_threads=n_threads)
        except VisionEncoderError as exc:
            raise ProjectorError(str(exc)) from None
        if not self.encoder.supports_vision:
            self.close()
            raise ProjectorError(f"{self.path} has no vision encoder (an audio-only projector?)")
        self.uses_mrope = self.encoder.uses_mrope  # images laid out in 2-D, their cells sharing a position
        self.marker = self.encoder.marker

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
        self.encoder.close()

    def encode(self, image: ImageLike, *, add_special: bool = False) -> list[TextChunk | ImageChunk]:
        """The chunks of one image as the model reads it: marker tokens and embeddings, in order."""
        return self.encoder.encode(np.asarray(load_image(image)), add_special=add_special)
