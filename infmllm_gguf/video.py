"""Video as a stream of images: frames sampled at a fixed rate, a timestamp before each.

Sources: a video file (decoded with PyAV), an animated GIF (pillow), or a directory of images
(taken as consecutive frames, one every 1/fps seconds, in name order). Frames are decoded one at
a time and only the sampled ones are converted to images, so an hour of video streams in
constant memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from PIL import Image, ImageSequence, UnidentifiedImageError

from .extras import require
from .multimodal import load_image

T = TypeVar("T")


@dataclass(frozen=True)
class Frame:
    t: float            # seconds from the start of the source
    image: Image.Image  # RGB


def timestamp(t: float) -> str:
    """The text fed before a frame: ``[t=00:01:05]``."""
    s = int(t)
    return f"[t={s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}]"


def frame_parts(frame: Frame) -> tuple[str, Image.Image]:
    """What a frame streams as: its timestamp text, then its image."""
    return timestamp(frame.t), frame.image


def _sample(timeline: Iterable[tuple[float, float, T]], fps: float, start: float, end: float | None,
            max_frames: int | None) -> Iterator[tuple[float, T]]:
    """From (time, duration, frame) in time order, the frame on screen at each sample time
    start, start + 1/fps, ... (before `end`), at most `max_frames` of them."""
    k = n = 0
    for t, duration, frame in timeline:
        while True:
            s = start + k / fps
            if (end is not None and s >= end) or (max_frames is not None and n >= max_frames):
                return
            if s >= t + duration:
                break
            yield s, frame
            k += 1
            n += 1


def _video_timeline(path: Path, start: float) -> Iterator[tuple[float, float, object]]:
    av = require("av", "reading a video file")

    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise ValueError(f"cannot read {path} as a video ({exc})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or 25)
        if start > 0:  # to the keyframe before `start`; earlier frames are skipped by _sample
            container.seek(int(start / stream.time_base), stream=stream)
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                duration = float(frame.duration * frame.time_base) if frame.duration else 1 / rate
                yield float(frame.time), duration, frame
        except av.FFmpegError as exc:
            raise ValueError(f"{path}: decoding failed ({exc})") from None


def _gif_timeline(image: Image.Image) -> Iterator[tuple[float, float, Image.Image]]:
    t = 0.0
    for frame in ImageSequence.Iterator(image):
        duration = frame.info.get("duration", 100) / 1000 or 0.1  # pillow reports 0 for "as fast as possible"
        yield t, duration, frame
        t += duration


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in Image.registered_extensions())


def _is_animated(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) > 1
    except (UnidentifiedImageError, OSError):
        return False


def _sampled_images(path: Path, fps: float, start: float, end: float | None,
                    max_frames: int | None) -> Iterator[tuple[float, Image.Image]]:
    if path.is_dir():
        timeline = ((i / fps, 1 / fps, p) for i, p in enumerate(_image_files(path)))
        for t, p in _sample(timeline, fps, start, end, max_frames):
            yield t, load_image(p)
    elif _is_animated(path):
        with Image.open(path) as im:
            for t, frame in _sample(_gif_timeline(im), fps, start, end, max_frames):
                yield t, frame.convert("RGB")
    else:
        for t, frame in _sample(_video_timeline(path, start), fps, start, end, max_frames):
            yield t, frame.to_image()


def iter_frames(source: str | os.PathLike, *, fps: float = 1.0, max_frames: int | None = None,
                start: float | None = None, end: float | None = None) -> Iterator[Frame]:
    """The frames of `source` sampled at `fps`, from `start` to `end` seconds, at most `max_frames`.

    Raises ValueError when the source cannot be read or gives no frame in the range.
    """
    path = Path(source)
    start = float(start or 0.0)
    if not fps > 0:
        raise ValueError(f"fps must be positive (got {fps})")
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"need 0 <= start < end (got start={start}, end={end})")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1 (got {max_frames})")
    if not path.exists():
        raise ValueError(f"video not found: {path}")
    n = 0
    for t, image in _sampled_images(path, fps, start, end, max_frames):
        n += 1
        yield Frame(t, image)
    if n == 0:
        span = f" between {start:g} s and {end:g} s" if end is not None else (f" after {start:g} s" if start else "")
        raise ValueError(f"{path} gave no frames{span}")


class VideoParts:
    """What a video source streams: for each sampled frame a timestamp text, then the image; with a
    progress bar of frames done, its postfix from `status()` (say, the cache's occupancy). `frames`
    counts the frames given so far. Iterating decodes lazily, one frame at a time."""

    def __init__(self, source: str | os.PathLike, *, fps: float = 1.0, max_frames: int | None = None,
                 start: float | None = None, end: float | None = None, progress: bool = True,
                 status: Callable[[], str] | None = None):
        self.source, self.progress, self.status = source, progress, status
        self.sampling = dict(fps=fps, max_frames=max_frames, start=start, end=end)
        self.frames = 0

    def __iter__(self) -> Iterator[str | Image.Image]:
        from tqdm import tqdm

        frames = iter_frames(self.source, **self.sampling)
        total = expected_frames(self.source, **self.sampling) if self.progress else None
        with tqdm(total=total, unit="frame", disable=not self.progress, dynamic_ncols=True) as bar:
            for frame in frames:
                yield from frame_parts(frame)
                self.frames += 1  # runs when the next part is asked for: the frame has been fed
                bar.update(1)
                if self.status is not None:
                    bar.set_postfix_str(self.status(), refresh=False)


def expected_frames(source: str | os.PathLike, *, fps: float = 1.0, max_frames: int | None = None,
                    start: float | None = None, end: float | None = None) -> int | None:
    """How many frames `iter_frames` will give, from the source's duration when known (for the
    progress bar's total); None when unknown."""
    path = Path(source)
    duration: float | None = None
    if path.is_dir():
        duration = len(_image_files(path)) / fps
    elif path.is_file() and not _is_animated(path):
        av = require("av", "reading a video file")

        try:
            with av.open(str(path)) as c:
                duration = c.duration / 1e6 if c.duration else None
        except av.FFmpegError:
            return None
    if duration is None:
        return max_frames
    span = min(duration, end if end is not None else duration) - (start or 0.0)
    n = max(0, int(-(-span * fps // 1)))  # ceil
    return n if max_frames is None else min(n, max_frames)
