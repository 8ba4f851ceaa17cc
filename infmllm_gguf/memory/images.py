"""Where the memory keeps the stream's images: each one's embeddings (the projector's output, as
decoded), so that a recalled image is decoded again whole without its file or the projector.

In the token store an image's cells are `IMAGE_ID` (no text matches it): blocks are ranked by the
text around an image (its turn's words, a video frame's timestamp), and a chosen range that
touches an image takes all of it or none of it (`whole_images`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_ID = -1


@dataclass
class StoredImage:
    first: int               # stream index of its first cell
    embeddings: np.ndarray   # float16 [n, n_embd]
    non_causal: bool         # decoded in one batch with full attention inside it (Gemma 3)
    layout: tuple[np.ndarray, int] | None = None  # an M-RoPE image's position offsets [4, n] and span

    @property
    def end(self) -> int:
        return self.first + len(self.embeddings)


class ImageStore:
    """The images in stream order, their embeddings at most `cap_bytes` in all (the oldest dropped
    beyond: their cells then stay unrecallable text-less gaps)."""

    def __init__(self, cap_bytes: int):
        self.cap_bytes = cap_bytes
        self.images: list[StoredImage] = []
        self.dropped = 0  # images

    @property
    def nbytes(self) -> int:
        return sum(i.embeddings.nbytes for i in self.images)

    def add(self, embeddings: np.ndarray, first: int, *, non_causal: bool,
            layout: tuple[np.ndarray, int] | None = None) -> None:
        """An image's embeddings as decoded; a causal image decoded in several chunks arrives in
        pieces, each continuing the last (an M-RoPE image, `layout`, comes whole)."""
        last = self.images[-1] if self.images else None
        if last is not None and layout is None and last.layout is None and not non_causal and not last.non_causal \
                and last.end == first:
            last.embeddings = np.concatenate((last.embeddings, embeddings.astype(np.float16)))
        else:
            self.images.append(StoredImage(first, embeddings.astype(np.float16), non_causal, layout))
        while len(self.images) > 1 and self.nbytes > self.cap_bytes:
            self.images.pop(0)
            self.dropped += 1

    def at(self, index: int) -> StoredImage | None:
        """The image holding stream index `index`, if it is still kept."""
        k = np.searchsorted([i.first for i in self.images], index, side="right") - 1
        if k >= 0 and self.images[k].first <= index < self.images[k].end:
            return self.images[k]
        return None

    # -- state ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        n_embd = self.images[0].embeddings.shape[1] if self.images else 0
        return {"dropped_images": self.dropped}, {
            "image_first": np.array([i.first for i in self.images], dtype=np.int64),
            "image_tokens": np.array([len(i.embeddings) for i in self.images], dtype=np.int64),
            "image_non_causal": np.array([i.non_causal for i in self.images], dtype=bool),
            "image_n_pos": np.array([i.layout[1] if i.layout else 0 for i in self.images], dtype=np.int64),
            "image_layout": np.concatenate([i.layout[0] if i.layout else np.zeros((4, len(i.embeddings)), np.int64)
                                            for i in self.images], axis=1) if self.images
            else np.zeros((4, 0), dtype=np.int64),
            "image_embeddings": (np.concatenate([i.embeddings for i in self.images]) if self.images
                                 else np.zeros((0, n_embd), dtype=np.float16))}

    @staticmethod
    def check_state(arrays: dict[str, np.ndarray]) -> None:
        """Files saved before images were kept have none of these arrays: they hold no image."""
        first, tokens = arrays.get("image_first"), arrays.get("image_tokens")
        if first is None:
            return
        embeddings, flags = arrays.get("image_embeddings"), arrays.get("image_non_causal")
        if tokens is None or embeddings is None or flags is None or not first.shape == tokens.shape == flags.shape \
                or embeddings.ndim != 2 or int(tokens.sum()) != len(embeddings):
            raise ValueError("the saved memory's images do not match their embeddings")
        layout, n_pos = arrays.get("image_layout"), arrays.get("image_n_pos")  # absent before M-RoPE images
        if (layout is None) != (n_pos is None) or layout is not None and (
                layout.shape != (4, len(embeddings)) or n_pos.shape != first.shape):
            raise ValueError("the saved memory's image positions do not match its images")

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.dropped = meta.get("dropped_images", 0)
        self.images = []
        if arrays.get("image_first") is None:
            return
        ends = np.cumsum(arrays["image_tokens"])
        n_pos = arrays.get("image_n_pos", np.zeros(len(ends), dtype=np.int64)).tolist()
        for first, start, end, flag, span in zip(arrays["image_first"].tolist(), ends - arrays["image_tokens"], ends,
                                                 arrays["image_non_causal"].tolist(), n_pos):
            layout = (arrays["image_layout"][:, start:end].astype(np.int64), span) if span else None
            self.images.append(StoredImage(first, arrays["image_embeddings"][start:end].astype(np.float16), flag,
                                           layout))


def whole_images(spans: list[tuple[int, int]], ids: np.ndarray, indices: np.ndarray, images: ImageStore,
                 room: int) -> list[tuple[int, int]]:
    """`spans` (ranges of stored tokens, in stream order) with each image they touch taken whole,
    while everything fits in `room` tokens, or left out (an image no longer kept is left out too)."""
    out: list[tuple[int, int]] = []
    used = 0
    for a, b in spans:
        k = a
        while k < b:
            if ids[k] != IMAGE_ID:
                end = k + int(np.argmax(ids[k:b] == IMAGE_ID)) if np.any(ids[k:b] == IMAGE_ID) else b
                take = min(end - k, room - used)
                if take > 0:
                    out.append((k, k + take))
                    used += take
                k = end
                continue
            image = images.at(int(indices[k]))
            if image is None:  # dropped beyond the cap: skip its cells
                k += 1
                continue
            start = int(np.searchsorted(indices, image.first))
            stop = start + len(image.embeddings)
            whole = stop <= ids.size and indices[start] == image.first and indices[stop - 1] == image.end - 1
            if whole and used + stop - start <= room and not (out and out[-1][1] > start):
                out.append((start, stop))
                used += stop - start
            k = max(stop, k + 1)
    merged: list[tuple[int, int]] = []
    for a, b in out:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged
