"""Rankings that follow meaning: the embedding table's neighbours (`embedding`) and the model's hidden
states (`hidden`), checked as pure functions, against llama.cpp's own layer output, and on the
default model where the lexical ranking misses a paraphrased fact."""
import sys
from pathlib import Path

import numpy as np
import pytest

from infmllm_gguf.memory import Memory, MemoryConfig, bm25, block_starts, choose
from infmllm_gguf.memory import hidden
from infmllm_gguf.memory.hidden import DIMENSIONS, VectorStore, dequantize, hidden_layer, maxsim, quantize
from infmllm_gguf.memory.ranking import held_verbatim, weighted_bm25
from infmllm_gguf.session import StreamSession

sys.path.insert(0, str(Path(__file__).parent))
from eval_reference import layer_outputs  # noqa: E402


def test_weighted_bm25_counts_a_neighbour_by_its_weight():
    tokens = np.array([5, 5, 9, 9, 7, 7, 9, 9, 3, 3, 9, 9])  # blocks of 4: [5 5 9 9] [7 7 9 9] [3 3 9 9] ...
    starts = np.array([0, 4, 8])
    alone, _ = bm25(tokens, starts, 4, np.array([5]))
    same, _ = weighted_bm25(tokens, starts, 4, [(np.array([5]), np.ones(1))])
    np.testing.assert_allclose(alone, same)
    score, matched = weighted_bm25(tokens, starts, 4, [(np.array([5, 7]), np.array([1.0, 0.5]))])
    assert score[0] > score[1] > score[2] == 0 and matched.tolist() == [1, 1, 0]


def test_a_block_whose_text_the_cache_holds_word_for_word_is_not_needed():
    sentence = [7, 8, 9, 10, 11]
    tokens = np.array(sentence * 4 + [1, 2, 3, 4, 5, 6, 20, 21, 22, 23] + sentence * 2)
    held = np.zeros(tokens.size, dtype=bool)
    held[-10:] = True  # the cache holds the last two copies of the sentence
    starts = np.array([0, 2, 18, 20, 24])
    # blocks of 6: [7 8 9 10 11 7], [9 10 11 7 8 9] (another cut of the same sentence),
    # [10 11 1 2 3 4], [1 2 3 4 5 6], [5 6 20 21 22 23]
    assert held_verbatim(tokens, held, starts, 6, np.arange(5), piece=3).tolist() == [True, True, False, False, False]
    assert not held_verbatim(tokens, held, starts, 6, np.arange(5), piece=3, skip=8).any()  # an image's
    assert not held_verbatim(tokens, np.zeros_like(held), starts, 6, np.arange(5), piece=3).any()
    # held [256, 0, 0] is bytes 00 01 00 00 00 00 00 00 00 00 00 00: [1, 0] (01 00 00 00 00 00 00 00)
    # lies in it one byte in, not on a token
    tokens = np.array([256, 0, 0, 1, 0])
    held = np.array([True, True, True, False, False])
    assert not held_verbatim(tokens, held, np.array([3]), 2, np.array([0])).any()
    assert held_verbatim(np.array([256, 0, 0, 0, 0]), held, np.array([3]), 2, np.array([0])).all()


def test_maxsim_finds_the_block_that_holds_a_close_token():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((320, DIMENSIONS))
    query = rng.standard_normal((6, DIMENSIONS))
    close = [162, 166, 170]  # in blocks 9 (tokens 144..175) and 10 (160..191)
    vectors[close] = query[1:4] + 0.05 * rng.standard_normal((3, DIMENSIONS))
    starts = block_starts(320, 32)
    score = maxsim(query, *quantize(vectors), starts, 32)
    assert set(np.argsort(-score)[:2]) == {9, 10}
    vectors[close] = 0  # a token without a vector matches nothing
    assert not {9, 10} & set(np.argsort(-maxsim(query, *quantize(vectors), starts, 32))[:2])


def test_quantized_vectors_keep_their_direction():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((200, DIMENSIONS)) * rng.uniform(0.01, 300, (200, 1)) + 40
    rows[5] = 0
    codes, scales = quantize(rows)
    assert codes.dtype == np.int8 and scales.dtype == np.float16 and np.abs(codes).max() == 127
    back = dequantize(codes, scales)
    assert not back[5].any() and scales[5] == 0  # a token without a vector stays one
    back, rows = np.delete(back, 5, axis=0), np.delete(rows, 5, axis=0)
    cosine = np.sum(back * rows, axis=1) / np.linalg.norm(back, axis=1) / np.linalg.norm(rows, axis=1)
    assert cosine.min() > 0.999, cosine.min()


def reference_maxsim(query, vectors, starts, window):
    """maxsim written out: centre on the mean of the vectors that are not zeros, cosines, each
    block's best per query token by a loop, standardised over the blocks, averaged."""
    v = vectors.astype(np.float64)
    present = np.abs(v).sum(axis=1) > 0
    mean = v[present].mean(axis=0)
    v, q = v - mean, query.astype(np.float64) - mean
    cosine = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
    cosine[:, ~present] = 0
    best = np.array([cosine[:, s:s + window].max(axis=1) for s in starts])  # [blocks, query tokens]
    return ((best - best.mean(axis=0)) / (best.std(axis=0) + 1e-6)).mean(axis=1)  # one block: 0


@pytest.mark.parametrize("n, window", [(5, 32), (32, 32), (33, 32), (1000, 32), (999, 7), (2000, 64), (40, 2)])
def test_maxsim_is_late_interaction_over_blocks(monkeypatch, n, window):
    """The one-pass, chunked maxsim against the plain computation, chunks of 48 tokens (not a
    multiple of every block), the last block off the half-window grid, tokens without a vector."""
    monkeypatch.setattr(hidden, "CHUNK", 48)
    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, DIMENSIONS)) * rng.uniform(1, 5, (n, 1)) + 5
    vectors[rng.random(n) < 0.1] = 0
    codes, scales = quantize(vectors)
    query = rng.standard_normal((7, DIMENSIONS)) + 5
    starts = block_starts(n, window)
    np.testing.assert_allclose(maxsim(query, codes, scales, starts, window),
                               reference_maxsim(query, dequantize(codes, scales), starts, min(window, n)), atol=1e-3)


def test_vector_store_keeps_the_mean_of_what_it_holds():
    rng = np.random.default_rng(0)
    store = VectorStore(cap=100)
    rows = rng.standard_normal((250, DIMENSIONS))
    rows[::7] = 0  # tokens without a vector do not count
    codes, scales = quantize(rows)
    for a in range(0, 250, 30):
        store.append(np.arange(a, min(a + 30, 250)), codes[a:a + 30], scales[a:a + 30])
    kept = dequantize(codes[150:], scales[150:])
    np.testing.assert_allclose(store.mean(), kept[np.abs(kept).sum(axis=1) > 0].astype(np.float64).mean(axis=0),
                               atol=1e-5)
    beyond = store.aligned(np.arange(120, 250))
    assert not beyond[0][:30].any() and not beyond[1][:30].any()  # beyond the cap: none
    np.testing.assert_array_equal(dequantize(*beyond)[30:], kept)
    np.testing.assert_array_equal(dequantize(*store.aligned(np.arange(150, 250, 2))), kept[::2])
    restored = VectorStore(cap=100)
    restored.load_state(store.state())
    np.testing.assert_allclose(restored.mean(), store.mean(), atol=1e-6)
    earlier = VectorStore(cap=100)  # an earlier version's save (float16, 64 dimensions): none kept
    earlier.load_state({"vector_indices": np.arange(3), "vectors": np.ones((3, 64), np.float16)})
    assert earlier.present == 0 and earlier.arrays()[0].size == 0


def test_the_hidden_ranking_falls_back_to_bm25_where_no_layer_output_was_seen():
    """A model whose layer output is named otherwise (the store keeps only zeros): BM25 ranks."""
    from types import SimpleNamespace

    memory = Memory(MemoryConfig(), budget=512)
    store = VectorStore(cap=1000)
    store.append(np.arange(200), np.zeros((200, DIMENSIONS), np.int8), np.zeros(200, np.float16))
    memory.hidden = SimpleNamespace(store=store)  # embed() would fail if it were called
    ids = np.random.default_rng(0).integers(0, 50, 200)
    starts, score, matched = memory.blocks(ids, np.arange(200), [3, 7, 9])
    expected = bm25(ids, starts, memory.window, np.array([3, 7, 9]))
    np.testing.assert_allclose(score, expected[0])
    np.testing.assert_array_equal(matched, expected[1])


def test_hidden_vectors_are_llamas_layer_output(tiny_llama):
    """The vectors the memory keeps are llama.cpp's layer output for each token (read by an
    independent eval callback on a fresh context), projected, in stream order."""
    tokens = [10 + (7 * i) % 90 for i in range(96)]
    with StreamSession(tiny_llama, "inf-mllm", budget=128, chunk=32, n_threads=2,
                       memory=MemoryConfig(ranking="hidden", reserve=32)) as s:
        s.feed_tokens(tokens)
        indices, codes, scales = s.memory.hidden.store.arrays()
        vectors = dequantize(codes, scales)
        projection, layer = s.memory.hidden.capture.projection, hidden_layer(s.model.n_layer)
    reference = layer_outputs(tiny_llama, tokens, layer) @ projection
    assert indices.tolist() == list(range(96))
    cosine = np.sum(vectors * reference, axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.999, cosine.min()


def test_prompt_vectors_are_read_after_a_start_token(tiny_llama):
    """A prompt is decoded alone after the model's start token, whose vector is dropped: the first
    position's state (the attention sink's) is no prompt token's."""
    tokens = [10 + (5 * i) % 90 for i in range(20)]
    with StreamSession(tiny_llama, "inf-mllm", budget=128, chunk=32, n_threads=2,
                       memory=MemoryConfig(ranking="hidden", reserve=32)) as s:
        hidden = s.memory.hidden
        vectors, start = hidden.embed(tokens), s.model.bos_token
        projection, layer = hidden.capture.projection, hidden_layer(s.model.n_layer)
    assert start >= 0 and vectors.shape == (20, DIMENSIONS)
    reference = layer_outputs(tiny_llama, [start] + tokens, layer)[1:] @ projection
    cosine = np.sum(vectors * reference, axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.999, cosine.min()


FACT = "\nMy sister has a cat named Marmalade.\n"
QUESTION = "\n\nQuestion: What is my sibling's pet called?\nAnswer: My sibling's pet is called"


@pytest.fixture(scope="module")
def filler():
    from infmllm_gguf.data import shakespeare_path

    return shakespeare_path().read_text(encoding="utf-8")[300_000:312_000]


def test_hidden_states_find_the_paraphrased_fact_that_words_miss(default_model, filler):
    """The fact, 2,000 tokens back, shares no content word with the question: BM25 re-reads other
    text, the hidden-state ranking re-reads the fact."""
    found = {}
    for ranking in ("lexical", "hidden"):
        with StreamSession(default_model, "streaming-llm", budget=512, chunk=128, n_threads=2,
                           memory=MemoryConfig(ranking=ranking)) as s:
            s.feed_text(filler[:4000])
            start = s.stats.tokens_seen
            s.feed_text(FACT)
            end = s.stats.tokens_seen
            s.feed_text(filler[4000:12000])
            assert s.stats.tokens_seen - start > 2000
            assert not np.isin(np.arange(start, end), s.cached_stream_indices()).any()
            query = s.model.tokenize(QUESTION, add_special=False)
            ids, indices = s.memory.store.arrays()
            order, starts = s.memory.rank(s.cache, query, ids, indices)
            spans = choose(order, starts, s.memory.window, ids.size, s.memory.reserve)
            chosen = np.concatenate([indices[a:b] for a, b in spans]) if spans else np.zeros(0)
            found[ranking] = bool(np.isin(np.arange(start, end), chosen).all())
    assert found == {"lexical": False, "hidden": True}
