"""The synthetic Qwen2-VL projector (`write_qwen2vl_mmproj`) through libmtmd, paired with the zoo's
Qwen2-VL text model: its images become M-RoPE tokens on a grid of nx x ny that take max(nx, ny)
positions, and mtmd's own helper decodes a whole prompt around one into a llama.cpp context."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from PIL import Image
from llama_cpp import llama_cpp as llama
from llama_cpp import mtmd_cpp as mtmd

from infmllm_gguf import zoo
from infmllm_gguf.multimodal import ImageChunk, Projector, TextChunk
from infmllm_gguf.runtime import Model, Runtime
from infmllm_gguf.runtime.mtmd import VisionEncoder
from infmllm_gguf.synthetic_mmproj import qwen2vl_grid, write_qwen2vl_mmproj

N_EMBD = 128  # the zoo's qwen2vl text model

#: (width, height) -> the (nx, ny) token grid libmtmd gives it, with patch 14 and 2 x 2 merging:
#: 56x84 is below the 8-token minimum and is scaled up to 84x112; 112x56 is exactly 8 tokens;
#: 300x200 rounds to 308x196
GRIDS = {(56, 84): (3, 4), (112, 56): (4, 2), (300, 200): (11, 7)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2vl")
    return zoo.write(root / "qwen2vl.gguf", "qwen2vl"), write_qwen2vl_mmproj(root / "mmproj.gguf", N_EMBD)


@pytest.fixture(scope="module")
def model(files):
    with Model(files[0], n_gpu_layers=0) as m:
        yield m


@pytest.fixture(scope="module")
def encoder(files, model):
    # one thread: the test machine is shared, and these images are a few dozen patches
    enc = VisionEncoder(files[1], model, use_gpu=False, n_threads=1)
    yield enc
    enc.close()


def image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


class Prompt:
    """libmtmd's chunks of `text` with `rgb` at the media marker (the caller frees them with close)."""

    def __init__(self, encoder: VisionEncoder, text: str, rgb: np.ndarray):
        self.bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0],
                                            rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        self.chunks = mtmd.mtmd_input_chunks_init()
        raw = text.encode()
        inp = mtmd.mtmd_input_text(raw, len(raw), True, True)
        rc = mtmd.mtmd_tokenize(encoder.ctx, self.chunks, ctypes.byref(inp),
                                (mtmd.mtmd_bitmap_p_ctypes * 1)(self.bitmap), 1)
        assert rc == 0, f"mtmd_tokenize returned {rc}"
        self.parts = [mtmd.mtmd_input_chunks_get(self.chunks, i)
                      for i in range(mtmd.mtmd_input_chunks_size(self.chunks))]
        self.types = [mtmd.mtmd_input_chunk_get_type(c) for c in self.parts]

    def close(self) -> None:
        mtmd.mtmd_input_chunks_free(self.chunks)
        mtmd.mtmd_bitmap_free(self.bitmap)


@pytest.fixture
def prompt(encoder):
    made = []

    def make(text: str, rgb: np.ndarray) -> Prompt:
        made.append(Prompt(encoder, text, rgb))
        return made[-1]
    yield make
    for p in made:
        p.close()


def test_the_text_model_makes_libmtmd_place_image_tokens_with_mrope(encoder):
    assert encoder.supports_vision
    assert encoder.uses_mrope


@pytest.mark.parametrize("size", list(GRIDS), ids=[f"{w}x{h}" for w, h in GRIDS])
def test_an_image_is_a_grid_of_tokens_that_takes_max_nx_ny_positions(encoder, prompt, size):
    width, height = size
    nx, ny = GRIDS[size]
    assert qwen2vl_grid(width, height) == (nx, ny)  # the module's prediction agrees with what libmtmd does
    p = prompt(f"Look: {encoder.marker} there.", image(width, height))
    # <|vision_start|> and <|vision_end|> are text around the image
    text, img = mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT, mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
    assert p.types == [text, img, text]
    chunk = p.parts[1]
    tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
    assert (mtmd.mtmd_image_tokens_get_nx(tokens), mtmd.mtmd_image_tokens_get_ny(tokens)) == (nx, ny)
    assert mtmd.mtmd_input_chunk_get_n_tokens(chunk) == nx * ny
    assert mtmd.mtmd_input_chunk_get_n_pos(chunk) == max(nx, ny) < nx * ny

    # each token sits at (row, column) of the grid, offset by the image's first position; the
    # temporal component stays at that first position
    pos_0 = mtmd.mtmd_input_chunk_get_n_pos(p.parts[0])
    positions = (mtmd.mtmd_decoder_pos * (nx * ny))()
    mtmd.mtmd_helper_image_get_decoder_pos(tokens, pos_0, positions)
    got = np.array([(q.t, q.y, q.x, q.z) for q in positions])
    rows, cols = np.divmod(np.arange(nx * ny), nx)
    np.testing.assert_array_equal(got, np.stack([np.full(nx * ny, pos_0), pos_0 + rows, pos_0 + cols,
                                                 np.zeros(nx * ny, dtype=int)], axis=1))


def test_the_embeddings_have_the_text_models_width_and_depend_on_the_image(encoder):
    chunks = encoder.encode(image(112, 56))
    assert [type(c) for c in chunks] == [TextChunk, ImageChunk, TextChunk]
    embd = chunks[1].embeddings
    assert embd.shape == (8, N_EMBD) and embd.dtype == np.float32
    assert np.isfinite(embd).all()
    assert 0.03 < embd.std() < 0.3  # out_std 0.1
    assert not chunks[1].non_causal  # Qwen2-VL decodes its images causally
    assert np.abs(np.diff(embd, axis=0)).max() > 1e-3  # the tokens differ from one another
    other = encoder.encode(image(112, 56, seed=1))[1].embeddings
    assert np.abs(other - embd).max() > 1e-3


def test_mtmds_helper_decodes_a_whole_prompt_with_an_image(encoder, model, prompt):
    nx, ny = GRIDS[(300, 200)]
    p = prompt(f"A picture: {encoder.marker} What is in it?", image(300, 200))
    n_pos = [mtmd.mtmd_input_chunk_get_n_pos(c) for c in p.parts]
    n_tokens = [mtmd.mtmd_input_chunk_get_n_tokens(c) for c in p.parts]
    assert n_pos[1] == max(nx, ny) and n_tokens[1] == nx * ny
    assert mtmd.mtmd_helper_get_n_pos(p.chunks) == sum(n_pos) < sum(n_tokens)

    rt = Runtime(model, n_ctx=256, n_gpu_layers=0, n_threads=1)
    try:
        new_n_past = llama.llama_pos(-1)
        rc = mtmd.mtmd_helper_eval_chunks(encoder.ctx, rt.ctx, p.chunks, 0, 0, 64, True, ctypes.byref(new_n_past))
        assert rc == 0
        # the text after the image continues at the image's first position + max(nx, ny)
        assert new_n_past.value == sum(n_pos)
        assert llama.llama_memory_seq_pos_min(rt.kv, 0) == 0
        assert llama.llama_memory_seq_pos_max(rt.kv, 0) == sum(n_pos) - 1
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(rt.ctx, -1), shape=(model.n_vocab,))
        assert np.isfinite(logits).all()
    finally:
        rt.close()


def test_the_projector_hands_over_libmtmds_mrope_layout(files, model):
    """`Projector.encode` gives each image token its (time, height, width, fourth) offsets from the
    image's first position, row by row, and the image's span max(nx, ny)."""
    projector = Projector(files[1], model, use_gpu=False, n_threads=1)
    try:
        assert projector.uses_mrope
        for (width, height), (nx, ny) in GRIDS.items():
            chunk, = [c for c in projector.encode(Image.fromarray(image(width, height))) if isinstance(c, ImageChunk)]
            rows, cols = np.divmod(np.arange(nx * ny), nx)
            np.testing.assert_array_equal(chunk.layout, [np.zeros(nx * ny), rows, cols, np.zeros(nx * ny)])
            assert chunk.n_pos == max(nx, ny)
    finally:
        projector.close()


def test_the_writer_rejects_head_sizes_the_vision_rope_cannot_split(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4"):
        write_qwen2vl_mmproj(tmp_path / "bad.gguf", N_EMBD, vision_embd=48, n_head=8)  # head size 6
    with pytest.raises(ValueError, match="n_ff must differ"):
        write_qwen2vl_mmproj(tmp_path / "bad.gguf", N_EMBD, n_ff=64)
