"""Images and video into a `StreamSession`: an image's tokens (through the vision projector) take
cells and compete with text for the budget; a video is its frames, a timestamp before each.
A part of `StreamSession` (its base class), which gives `projector`, `cache`, `chunk`, `runtime`
and the text feeding methods.
"""
from __future__ import annotations

import os
from typing import Iterable

from .multimodal import ImageChunk, ImageLike, MediaPart, TextChunk, first_checked
from .video import VideoParts


class MediaInput:
    """The image and video methods of `StreamSession`."""

    def feed_image(self, image: ImageLike) -> int:
        """Append an image (a path, its bytes or a PIL image) with the model's image markers; its
        tokens compete with text for the budget. Returns the number of image tokens fed."""
        if self.projector is None:
            raise ValueError("this session has no vision projector: pass mmproj=PATH (--mmproj) to use images")
        chunks = self.projector.encode(image, add_special=self.stats.tokens_seen == 0)
        # the tokens of a non-causal image attend to each other both ways, and an M-RoPE image's
        # share a position that llama.cpp removes at once: one batch must hold them (checked
        # before anything is fed)
        too_big = [(len(c.embeddings), c.non_causal) for c in chunks if isinstance(c, ImageChunk)
                   and (c.non_causal or c.layout is not None)
                   and len(c.embeddings) > (min(self.chunk, self.runtime.n_ubatch) if c.non_causal else self.chunk)]
        if too_big:
            n, non_causal = too_big[0]
            why = "attends over a whole image at once" if non_causal else "lays an image out in 2-D (M-RoPE)"
            raise ValueError(f"this model {why}: its {n} tokens must fit in one batch; raise the chunk (--chunk) "
                             f"to at least {n}")
        n_image = 0
        for c in chunks:
            if isinstance(c, TextChunk):
                self.feed_tokens(c.tokens)
                continue
            if c.non_causal or c.layout is not None:
                self.cache.decode(c.embeddings, causal=not c.non_causal,
                                  layout=None if c.layout is None else (c.layout, c.n_pos))
            else:
                self.cache.feed(c.embeddings, self.chunk)
            n_image += len(c.embeddings)
        return n_image

    def feed_media(self, parts: Iterable[MediaPart]) -> int:
        """Feed text and images in order (e.g. a timestamp before each video frame); returns the
        number of image tokens fed."""
        n_image = 0
        for part in parts:
            if isinstance(part, str):
                self.feed_text(part)
            else:
                n_image += self.feed_image(part)
        return n_image

    def video_parts(self, source: str | os.PathLike, *, fps: float = 1.0, max_frames: int | None = None,
              start: float | None = None, end: float | None = None, progress: bool = True) -> VideoParts:
        """The parts of a video for `feed_media` or `chat_media`, with the cache's occupancy on its
        progress bar. See `infmllm_gguf.video`."""
        def status() -> str:
            st = self.stats
            return f"cache {st.cells_cached}/{self.policy.budget} cells, {st.tokens_seen} tokens seen"
        return VideoParts(source, fps=fps, max_frames=max_frames, start=start, end=end, progress=progress,
                          status=status)

    def feed_video(self, source: str | os.PathLike, *, fps: float = 1.0, max_frames: int | None = None,
                   start: float | None = None, end: float | None = None, progress: bool = True) -> int:
        """Stream a video (a file, an animated GIF or a directory of images) sampled at `fps`, a
        timestamp such as ``[t=00:01:05]`` before each frame, evicting as it goes, so any length fits
        the budget. Returns the number of frames fed."""
        parts = self.video_parts(source, fps=fps, max_frames=max_frames, start=start, end=end, progress=progress)
        self.feed_media(first_checked(parts))
        return parts.frames
