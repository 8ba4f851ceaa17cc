"""The architecture matrix: every architecture of the zoo (`infmllm_gguf.zoo`) through attention
capture, eviction, re-indexing, per-layer compaction and a long stream, each against a reference
that does not use the code under test; and the README's support table, regenerated."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from eval_reference import softmax_scores
from infmllm_gguf import support, zoo
from infmllm_gguf.probes import rss_mib
from infmllm_gguf.runtime import Runtime
from infmllm_gguf.session import StreamSession

#: next-token KL divergence allowed between a re-indexed cache and a recompute of the kept tokens.
#: The kept keys here are the recompute's own, so only float rounding of the rotation remains
#: (measured: 2.6e-10 .. 1.9e-7 over the zoo); a shift off by one position gives 2.0e-5 .. 6.7e-2.
#: Far below 5.5e-4, what the plain-RoPE shift gives on SmolLM2 after a real eviction.
KL_TOLERANCE = 1e-6
N_TOKENS, WINDOW = 48, 8
KEPT_FIRST, GAP = 8, 16  # the cells before the evicted range, and its length
TOKENS = [259 + (i * 37) % 240 for i in range(N_TOKENS + 1)]  # 48 to decode, then one more
ARCHS = zoo.ARCHITECTURES


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = zoo.write(root / f"{arch}.gguf", arch)
        return made[arch]
    return get


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) of the two softmax distributions."""
    lp = p_logits - np.logaddexp.reduce(p_logits.astype(np.float64))
    lq = q_logits - np.logaddexp.reduce(q_logits.astype(np.float64))
    return float(np.sum(np.exp(lp) * (lp - lq)))


def runtime(path: Path, *, flash_attn: bool | None = False) -> Runtime:
    return Runtime(path, n_ctx=256, n_gpu_layers=0, flash_attn=flash_attn, n_threads=2)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["no-fa", "fa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_capture_agrees_with_llama_cpps_own_softmax(zoo_models, arch, flash_attn):
    """The capture of the last WINDOW queries equals, on every layer that has attention, the sum
    of llama.cpp's forward-pass softmax rows (eval callback, flash attention off). With flash
    attention on, only the first attention layer sees the same inputs as the reference: flash
    attention's f16 accumulation changes what later layers read (by up to 3% on deepseek2, whose
    MoE routing amplifies it), so those are held to 5%."""
    path = zoo_models(arch)
    reference, _ = softmax_scores(path, TOKENS[:N_TOKENS], WINDOW)
    with runtime(path, flash_attn=flash_attn) as rt:
        rt.capture_scores(WINDOW)
        rt.decode(TOKENS[:N_TOKENS], range(N_TOKENS))
        captured = rt.read_scores()
    assert sorted(reference) == list(captured.layers) == list(rt.kv_layers)
    if arch in zoo.HYBRID:  # the zoo's own account of which layers have attention
        assert list(rt.kv_layers) == zoo.hybrid.attention_layers(arch)
    for i, (row, layer) in enumerate(zip(captured.scores, captured.layers)):
        rtol = 5e-2 if flash_attn and i else 2e-3
        np.testing.assert_allclose(row, reference[layer], rtol=rtol, atol=2e-4, err_msg=f"{arch} layer {layer}")


def reindexed_logits(path: Path, *, delta: int, per_layer: bool = False) -> np.ndarray:
    """The cache an eviction of GAP leaves, re-indexed, then the next token's logits.

    The tokens after the gap are decoded right after the first ones and then moved GAP positions
    up (the shift applied to the keys at once), so that their keys and values are exactly those a
    recompute of the kept tokens computes, and the cache is what evicting a middle range leaves:
    cells at 0..a-1 and a+GAP... Re-indexing (a shift down by `delta`, or a per-layer compaction
    when `per_layer`) must then give the recompute's next-token distribution."""
    a, n = KEPT_FIRST, N_TOKENS
    with runtime(path) as rt:
        rt.decode(TOKENS[:n], range(n))
        rt.shift(a, n, GAP)
        rt.apply_pending_shifts()
        if per_layer:
            keep = np.concatenate((np.arange(a), np.arange(a + GAP, n + GAP)))
            rt.compact(np.stack([keep] * len(rt.kv_layers)))
        else:
            rt.shift(a + GAP, n + GAP, -delta)
        rt.decode(TOKENS[n:], [n + GAP - delta])
        return rt.logits()


def recomputed_logits(path: Path) -> np.ndarray:
    """The kept tokens decoded afresh at positions 0..n-1, then the next token."""
    with runtime(path) as rt:
        rt.decode(TOKENS, range(len(TOKENS)))
        return rt.logits()


@pytest.mark.parametrize("arch", ARCHS)
def test_reindexing_after_an_eviction_equals_a_recompute(zoo_models, arch):
    """Shifting the cells after an evicted range back gives the next-token distribution of the kept
    tokens recomputed at their new positions (hybrid models: the recurrent state follows); a shift off
    by one position does not."""
    path = zoo_models(arch)
    with runtime(path) as rt:
        assert rt.can_shift(), f"{arch}: positions cannot be shifted"
    expected = recomputed_logits(path)
    assert kl(expected, reindexed_logits(path, delta=GAP)) <= KL_TOLERANCE
    if uses_positions(path):  # without RoPE (Nemotron-H, Granite 4 hybrid) positions only order the cells
        assert kl(expected, reindexed_logits(path, delta=GAP - 1)) > KL_TOLERANCE, "a broken shift went unnoticed"


def uses_positions(path: Path) -> bool:
    """Whether the model's output depends on absolute positions at all (RoPE), measured: the same
    tokens decoded from position 0 and from position 100."""
    logits = []
    for start in (0, 100):
        with runtime(path) as rt:
            rt.decode(TOKENS, range(start, start + len(TOKENS)))
            logits.append(rt.logits())
    return kl(*logits) > KL_TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_per_layer_compaction_equals_a_recompute(zoo_models, arch):
    """Per-layer compaction (every layer keeping the same tokens here) re-rotates like the shift."""
    path = zoo_models(arch)
    with runtime(path) as rt:
        if not rt.can_compact():
            with pytest.raises(ValueError, match="compaction"):
                rt.compact(np.zeros((len(rt.kv_layers), 4), dtype=np.int32))
            pytest.skip(f"{arch}: per-layer compaction refused with a reason (README table)")
    assert kl(recomputed_logits(path), reindexed_logits(path, delta=GAP, per_layer=True)) <= KL_TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_a_long_stream_stays_flat(zoo_models, arch):
    """12,000 tokens through a 128-cell budget with the default policy: the cells stay within the
    budget and the process's resident memory does not grow after the first 3,000 (the memory tier,
    which keeps the stream by design, off: tests/test_memory.py bounds it)."""
    path = zoo_models(arch)
    rng = np.random.default_rng(0)
    with StreamSession(path, budget=128, chunk=256, n_gpu_layers=0, n_threads=2, flash_attn=False,
                       memory=False) as s:
        s.feed_tokens(rng.integers(259, 500, 3_000).tolist())
        before = rss_mib()
        s.feed_tokens(rng.integers(259, 500, 9_000).tolist())
        grown = rss_mib() - before
        stats = s.stats
    assert stats.tokens_seen == 12_000 and stats.cells_cached <= 128, stats
    assert grown < 4.0, f"{arch}: resident memory grew {grown:.1f} MiB over 9,000 tokens"


@pytest.mark.parametrize("arch", zoo.HYBRID)
def test_the_memory_rereads_into_a_hybrid_model(zoo_models, arch):
    """The memory tier beyond the budget on a hybrid model: a prompt whose words were evicted is
    ranked against the stored blocks and the best one is re-read into the attention cache, which
    stays within the budget; the session reports the attention layers as its bounded ones."""
    filler = " ".join(["some words of filler text"] * 40) + ". "
    with StreamSession(zoo_models(arch), budget=96, chunk=64, n_gpu_layers=0, n_threads=2, flash_attn=False,
                       memory=True, view_tokens=10_000) as s:
        s.feed_text(filler)
        start = s.stats.tokens_seen
        s.feed_text("the vault code is seven four one nine. ")
        end = s.stats.tokens_seen
        s.feed_text(filler + filler)
        assert start not in s.cached_stream_indices()
        s.generate("what is the vault code", max_tokens=4)
        (a, b), = s.memory.stats.last_recalled  # stream indices of the re-read copy
        stream = list(s.cache.recent_tokens)
        copied_from = [o for o in range(a - (b - a) + 1) if stream[o:o + b - a] == stream[a:b]]
        assert any(o < end and o + b - a > start for o in copied_from), (copied_from, start, end)
        assert s.stats.cells_cached <= 96 + s.generation_headroom
        assert s.bounded_layers == tuple(zoo.hybrid.attention_layers(arch))


@pytest.mark.parametrize("arch", zoo.HYBRID + ("qwen2vl",))
def test_a_saved_stream_continues_the_same(zoo_models, arch, tmp_path):
    """A hybrid model's save holds its recurrent state beside the evicted, re-indexed attention
    cache (and an M-RoPE model's its shifted positions): the restored session's next-token logits
    and the ones after the same tokens are those of the session that went on."""
    rng = np.random.default_rng(2)
    stream, after = rng.integers(259, 500, 1_500).tolist(), rng.integers(259, 500, 40).tolist()
    options = dict(budget=128, chunk=64, n_gpu_layers=0, n_threads=2, flash_attn=False)
    with StreamSession(zoo_models(arch), **options) as s:
        s.feed_tokens(stream)
        s.save(tmp_path / "s.npz")
        first = s.runtime.logits()
        s.feed_tokens(after)
        expected = s.runtime.logits()
    with StreamSession.restore(tmp_path / "s.npz", zoo_models(arch), n_gpu_layers=0, n_threads=2) as r:
        np.testing.assert_array_equal(r.runtime.logits(), first)
        r.feed_tokens(after)
        np.testing.assert_allclose(r.runtime.logits(), expected, atol=1e-5)


def test_readme_support_table_is_the_generated_one():
    """README.md's architecture table is `python -m infmllm_gguf.support --zoo` verbatim."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    match = re.search(r"<!-- support table -->\n(.*?)<!-- /support table -->", readme, re.S)
    assert match, "README.md has no generated support table"
    assert match.group(1) == support.zoo_table()


MROPE = [arch for arch in ARCHS if arch in ("qwen2vl", "qwen3vl", "qwen35")]
GRID = (4, 3)  # an image of 4 x 3 cells, as libmtmd lays out an M-RoPE image: 4 positions long


def image_layout_offsets() -> np.ndarray:
    """libmtmd's M-RoPE offsets of a GRID image (time, height, width, fourth), and its span."""
    nx, ny = GRID
    rows, cols = np.divmod(np.arange(nx * ny), nx)
    return np.stack([np.zeros(nx * ny), rows, cols, np.zeros(nx * ny)]).astype(np.int64)


def text_image_text(rt: Runtime, start: int = 0) -> int:
    """Decode 8 tokens, a GRID image of random embeddings, 24 tokens from position `start`;
    returns the next position."""
    from infmllm_gguf.layout import image_layout

    rng = np.random.default_rng(1)
    embd = rng.normal(0, 1, (GRID[0] * GRID[1], rt.model.n_embd_inp)).astype(np.float32)
    rt.decode(TOKENS[:8], range(start, start + 8))
    rt.decode_embeddings(embd, image_layout(image_layout_offsets(), start + 8))
    after = start + 8 + max(GRID)
    rt.decode(TOKENS[8:32], range(after, after + 24))
    return after + 24


@pytest.mark.parametrize("arch", MROPE)
def test_reindexing_an_mrope_image_equals_a_recompute(zoo_models, arch):
    """An M-RoPE image's cells (one time position, a grid of height and width positions) moved away
    and back by shifts give the recompute's next-token distribution; one position off does not."""
    path = zoo_models(arch)

    def logits(back: int) -> np.ndarray:
        with runtime(path) as rt:
            end = text_image_text(rt)
            if back:
                rt.shift(8, end, GAP)  # the image and the text after it, as an eviction before them leaves
                rt.apply_pending_shifts()
                rt.shift(8 + GAP, end + GAP, -back)
            rt.decode(TOKENS[32:33], [end + GAP - back if back else end])
            return rt.logits()

    expected = logits(0)
    assert kl(expected, logits(GAP)) <= KL_TOLERANCE
    assert kl(expected, logits(GAP - 1)) > KL_TOLERANCE, "a broken shift went unnoticed"


@pytest.mark.parametrize("arch", MROPE)
def test_an_mrope_image_is_captured_cell_by_cell(zoo_models, arch):
    """The capture reports each of an image's cells (they share one position) in the order they
    were decoded, and the eviction of the image's position removes all of them."""
    with runtime(zoo_models(arch)) as rt:
        rt.capture_scores(4)
        end = text_image_text(rt)
        captured = rt.read_scores()
        n_image = GRID[0] * GRID[1]
        assert list(captured.positions) == list(range(8)) + [8] * n_image + list(range(8 + max(GRID), end))
        assert rt.n_cached() == 32 + n_image
        rt.remove(8, 9)
        assert rt.n_cached() == 32
