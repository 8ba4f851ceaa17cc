"""Images with M-RoPE positions (Qwen2-VL and later) in the bounded cache: the zoo's Qwen2-VL text
model with the synthetic Qwen2-VL projector. A frame's cells share its time position and span the
larger side of its grid; they are evicted whole and re-indexed with their layout."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from infmllm_gguf import zoo
from infmllm_gguf.layout import image_groups, positions
from infmllm_gguf.probes import rss_mib
from infmllm_gguf.session import StreamSession
from infmllm_gguf.synthetic_mmproj import qwen2vl_grid, write_qwen2vl_mmproj

N_FRAMES, SIZE = 300, 56


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2vl-video")
    model = zoo.write(root / "qwen2vl.gguf", "qwen2vl")
    mmproj = write_qwen2vl_mmproj(root / "mmproj.gguf", 128)
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(N_FRAMES)]
    gif = root / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)  # 30 s at 10 fps
    return model, mmproj, gif


def session(files, **kwargs) -> StreamSession:
    return StreamSession(files[0], mmproj=files[1], budget=192, chunk=64, n_gpu_layers=0, n_threads=2,
                         flash_attn=False, **kwargs)


def test_a_long_video_streams_through_a_bounded_cache(files):
    """300 frames (and 300 more): the cache stays within its budget, frames leave it whole, the
    positions llama.cpp holds are the controller's layout, resident memory stays flat (the memory,
    off here, keeps frames by design, up to its image cap; its own test is below)."""
    nx, ny = qwen2vl_grid(SIZE, SIZE)
    per_frame = nx * ny
    with session(files, memory=False) as s:
        assert s.policy.granularity == "token"  # a frame's shared position cannot be compacted per layer
        assert s.feed_video(files[2], fps=10, max_frames=N_FRAMES, progress=False) == N_FRAMES
        before = rss_mib()
        assert s.feed_video(files[2], fps=10, max_frames=N_FRAMES, progress=False) == N_FRAMES
        grown = rss_mib() - before
        st = s.stats
        assert st.image_tokens_seen == 2 * N_FRAMES * per_frame
        assert st.cells_cached <= 192 and st.image_cells_evicted % per_frame == 0
        cache = s.cache
        groups = image_groups(cache.cells.advance)
        assert groups and all(b - a == per_frame and cache.cells.advance[b - 1] == max(nx, ny) for a, b in groups)
        assert np.count_nonzero(cache.cells.is_image) == len(groups) * per_frame  # whole frames only
        s.runtime.capture_scores(4)
        s.feed_text(" What is in the last frame?")
        assert np.array_equal(s.runtime.read_scores().positions, positions(cache.cells.advance))
    assert grown < 4.0, f"resident memory grew {grown:.1f} MiB over {N_FRAMES} frames"


def test_the_memory_rereads_a_frame_with_its_layout(files):
    """A question naming an early frame's timestamp re-reads that frame whole, laid out in 2-D again."""
    with session(files, memory=True) as s:
        s.feed_video(files[2], fps=10, max_frames=60, progress=False)
        assert s.memory.stats.images_stored == 60
        s.generate("What happens at [t=00:00:01]?", max_tokens=2)
        assert s.memory.stats.images_recalled >= 1
        assert all(b - a == qwen2vl_grid(SIZE, SIZE)[0] * qwen2vl_grid(SIZE, SIZE)[1]
                   for a, b in image_groups(s.cache.cells.advance))
