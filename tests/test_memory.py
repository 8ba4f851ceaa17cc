"""The memory tier: block ranking (pure NumPy, against direct counts), the token store, room making
under every policy, and recall end to end: a needle evicted from the cache comes back with memory
on and is lost with it off."""
import collections
import math

import numpy as np
import pytest

from infmllm_gguf.controller import CacheController, Decoded
from infmllm_gguf.memory import Memory, MemoryConfig, TokenStore, block_starts, bm25, choose
from infmllm_gguf.memory.images import IMAGE_ID, ImageStore, whole_images
from infmllm_gguf.memory.probe import rerank_by_attention
from infmllm_gguf.policies import make_policy
from infmllm_gguf.recall.needles import exact_match
from infmllm_gguf.recall.run import ask
from infmllm_gguf.runtime import Runtime
from infmllm_gguf.session import StreamSession


@pytest.mark.parametrize("n, window", [(1, 8), (7, 8), (8, 8), (9, 8), (100, 8), (101, 16), (1000, 64)])
def test_blocks_hold_every_half_window_span_whole(n, window):
    starts = block_starts(n, window)
    ends = np.minimum(starts + window, n)
    assert starts[0] == 0 and ends[-1] == n and np.all(np.diff(starts) > 0)
    for i in range(max(n - window // 2, 0) + 1):
        j = min(i + window // 2, n)
        assert np.any((starts <= i) & (j <= ends)), f"span [{i}, {j}) is cut by every block"


def reference_bm25(tokens, starts, window, query, k1=1.2, b=0.75):
    """BM25 written out block by block, from its textbook form."""
    blocks = [list(tokens[s:s + window]) for s in starts]
    avg = sum(map(len, blocks)) / len(blocks)
    scores = []
    for block in blocks:
        counts = collections.Counter(block)
        score = 0.0
        for t in set(query):
            df = sum(t in other for other in blocks)
            idf = math.log(1 + (len(blocks) - df + 0.5) / (df + 0.5))
            tf = counts[t]
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(block) / avg))
        scores.append(score)
    return np.array(scores)


def test_bm25_matches_the_textbook_formula():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 40, size=333)
    starts = block_starts(tokens.size, 32)
    query = [3, 3, 17, 39, 1000]
    score, matched = bm25(tokens, starts, 32, np.array(query))
    np.testing.assert_allclose(score, reference_bm25(tokens, starts, 32, query), rtol=1e-12)
    expected = [len({3, 17, 39} & set(tokens[s:s + 32].tolist())) for s in starts]
    assert matched.tolist() == expected


def test_bm25_ranks_the_block_with_the_rare_shared_tokens_first():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 50, size=2000)  # common tokens everywhere
    tokens[1234:1238] = [901, 902, 903, 904]  # a rare label, once
    starts = block_starts(tokens.size, 64)
    score, _ = bm25(tokens, starts, 64, np.array([7, 901, 902, 12]))
    best = starts[np.argmax(score)]
    assert best <= 1234 and 1238 <= best + 64


def test_choose_takes_the_best_blocks_that_fit_and_merges_them():
    starts = block_starts(256, 32)  # every 16
    assert choose(np.array([3, 4, 10]), starts, 32, 256, 64) == [(48, 96)]  # 3 and 4 overlap: 48 tokens, 10 no room
    assert choose(np.array([10, 3]), starts, 32, 256, 64) == [(48, 80), (160, 192)]
    assert choose(np.array([0]), starts, 32, 256, 16) == []


def test_token_store_caps_and_tracks_copies():
    store = TokenStore(cap=100)
    for i in range(0, 150, 30):
        store.append(range(i, i + 30), np.arange(i, i + 30))
    ids, indices = store.arrays()
    assert ids.tolist() == list(range(50, 150)) and indices.tolist() == list(range(50, 150)) and store.dropped == 50
    store.add_copies(np.array([500, 501]), np.array([60, 61]))
    held = store.held(indices, cached=np.array([55, 500]))
    assert np.flatnonzero(held).tolist() == [5, 10]  # 55 itself, 60 through its copy 500; 501 is gone
    assert store.copy_indices.tolist() == [500]
    meta, arrays = store.state()
    again = TokenStore(cap=100)
    TokenStore.check_state(meta, arrays)
    again.load_state(meta, arrays)
    assert [a.tolist() for a in again.arrays()] == [ids.tolist(), indices.tolist()] and again.dropped == 50
    arrays["indices"] = arrays["indices"][::-1].copy()
    with pytest.raises(ValueError, match="increasing"):
        TokenStore.check_state(meta, arrays)


def test_a_disk_store_keeps_what_ram_cannot_and_checks_its_file(tmp_path):
    store = TokenStore(cap=100, spill=tmp_path / "m.tokens")
    for i in range(0, 150, 30):
        store.append(range(i, i + 30), np.arange(i, i + 30))
    ids, indices = store.arrays()
    assert ids.tolist() == list(range(150)) and indices.tolist() == list(range(150))
    assert (store.spilled, store.in_ram, store.dropped) == (50, 100, 0)
    assert (tmp_path / "m.tokens").stat().st_size == 50 * TokenStore.BYTES_PER_TOKEN
    meta, arrays = store.state()
    store.append(range(150, 200), np.arange(150, 200))
    store.arrays()  # 100 more on disk: a rollback to `meta` cuts the file back
    again = TokenStore(cap=100)
    again.load_state(meta, arrays)
    assert [a.tolist() for a in again.arrays()] == [list(range(150))] * 2
    again.append(range(150, 160), np.arange(150, 160))
    assert again.arrays()[0].tolist() == list(range(160)) and again.spilled == 60
    with open(tmp_path / "m.tokens", "r+b") as f:  # an altered file: a warning, the RAM part goes on
        f.write(b"\xff" * 12)
    lost = TokenStore(cap=100)
    with pytest.warns(UserWarning, match="does not hold what was saved"):
        lost.load_state(meta, arrays)
    assert lost.arrays()[0].tolist() == list(range(50, 150)) and lost.dropped == 50
    (tmp_path / "file").write_text("")
    full = TokenStore(cap=10, spill=tmp_path / "file" / "m.tokens")  # cannot be written: as a full disk
    full.append(range(20), np.arange(20))
    with pytest.warns(UserWarning, match="cannot write"):
        full.arrays()
    assert full.spill is None and full.dropped == 10 and full.arrays()[0].tolist() == list(range(10, 20))


def test_memory_settings_are_checked():
    with pytest.raises(ValueError, match="ranking"):
        MemoryConfig(ranking="psychic")
    with pytest.raises(ValueError, match="store"):
        MemoryConfig(store="cloud")
    with pytest.raises(ValueError, match="half the budget"):
        Memory(MemoryConfig(reserve=300), budget=512)
    with pytest.raises(ValueError, match="hold a block"):
        Memory(MemoryConfig(window=64), budget=128)  # reserve 32 < one block
    assert Memory(MemoryConfig(ranking="lexical"), budget=96).window == 24
    assert Memory(MemoryConfig(ranking="lexical"), budget=1024).window == 64
    assert Memory(MemoryConfig(), budget=1024).window == 32  # the hidden ranking's
    # a quarter of the budget, at most 96 cells (a prefill before the first answer token), or as set
    assert [Memory(MemoryConfig(), budget=b).reserve for b in (256, 384, 512, 4096)] == [64, 96, 96, 96]
    assert Memory(MemoryConfig(reserve=200), budget=512).reserve == 200


@pytest.mark.parametrize("policy", ["streaming-llm", "inf-mllm", "h2o", "context-shift", "recent-only"])
def test_make_room_leaves_room_with_the_policy_and_no_eviction_after(tiny_llama, policy):
    with Runtime(tiny_llama, n_ctx=160, n_batch=32, n_threads=2) as rt:
        options = {"n_keep": 4} if policy == "context-shift" else {}
        cache = CacheController(rt, make_policy(policy, budget=128, **options))
        cache.feed([10 + i % 100 for i in range(400)], 32)
        before = cache.n_cached
        removed = cache.make_room(48)
        assert cache.n_cached == before - removed <= 128 - 48 and rt.n_cached() == cache.n_cached
        evictions = cache.stats.evictions
        cache.feed([20 + i % 50 for i in range(48)], 16)
        assert cache.stats.evictions == evictions and cache.n_cached <= 128
        assert cache.policy.budget == 128


def test_memory_changes_nothing_until_a_prompt(tiny_llama):
    """A stream without prompts (perplexity) reads the same with memory on: it only records."""
    tokens = [10 + (7 * i) % 90 for i in range(700)]
    nll = {}
    for memory in (None, MemoryConfig(reserve=32)):
        with StreamSession(tiny_llama, "inf-mllm", budget=128, chunk=32, n_threads=2, memory=memory) as s:
            nll[memory is None] = s.token_nll(tokens)
            if memory is not None:
                assert s.memory.stats.tokens_stored == len(tokens) and s.memory.stats.prompts == 0
    np.testing.assert_array_equal(nll[True], nll[False])


NEEDLE = " The pass key of the amber lantern is 48213. Remember it."
QUESTION = "\n\nQuestion: What is the pass key of the amber lantern?\nAnswer: The pass key of the amber lantern is"


def stream_with_needle(session: StreamSession, filler: str) -> tuple[int, int]:
    """Filler, the needle, then 1,500 characters more: the needle's stream indices [start, end)."""
    session.feed_text(filler[:3000])
    start = session.stats.tokens_seen
    session.feed_text(NEEDLE)
    end = session.stats.tokens_seen
    session.feed_text(filler[3000:9000])
    return start, end


@pytest.fixture(scope="module")
def filler():
    from infmllm_gguf.data import shakespeare_path

    return shakespeare_path().read_text(encoding="utf-8")[200_000:210_000]


def test_memory_brings_an_evicted_needle_back(default_model, filler):
    """Fails with memory off: the needle is 1,500 tokens back, the budget 256."""
    answers = {}
    for memory in (None, MemoryConfig(ranking="lexical", window=48, reserve=96)):
        with StreamSession(default_model, "streaming-llm", budget=256, chunk=64, n_threads=2,
                           memory=memory) as s:
            start, end = stream_with_needle(s, filler)
            assert not np.isin(np.arange(start, end), s.cached_stream_indices()).any()
            seen = s.stats.tokens_seen
            answers[memory is not None] = ask(s, QUESTION, 8)
            if memory is not None:
                spans = s.memory.stats.last_recalled
                n = sum(b - a for a, b in spans)
                assert spans[0][0] == seen and spans[-1][1] == seen + n <= seen + 96  # re-read first, in the reserve
                assert np.isin(np.arange(start, end), s.memory.store.copy_of).all()  # the whole needle re-read
                assert s.memory.stats.tokens_stored == s.stats.tokens_seen - n
    assert not exact_match(answers[False], "48213") and exact_match(answers[True], "48213"), answers


def test_memory_is_saved_with_the_session(default_model, filler, tmp_path):
    """A disk memory (most of it in the file, 500 tokens in RAM) saved and restored answers alike;
    its file outlives the session that saved it, a session that did not save deletes its own, and
    a restore whose file was lost warns and goes on with the RAM part."""
    memory = MemoryConfig(window=48, reserve=96, cap=500, store="disk", directory=str(tmp_path / "memory"))
    with StreamSession(default_model, "inf-mllm", budget=256, chunk=64, n_threads=2, memory=memory) as s:
        stream_with_needle(s, filler)
        s.save(tmp_path / "s.npz")
        ids, indices = s.memory.store.arrays()
        assert s.memory.stats.tokens_on_disk == ids.size - 500 > 1000
        reply = ask(s, QUESTION, 8)
    with StreamSession.restore(tmp_path / "s.npz", default_model, n_threads=2) as r:
        assert r.memory is not None and r.memory.config == memory
        assert [a.tolist() for a in r.memory.store.arrays()] == [ids.tolist(), indices.tolist()]
        assert ask(r, QUESTION, 8) == reply
    files = list((tmp_path / "memory").iterdir())
    assert len(files) == 1  # the saved one; the restored session's own was never written
    with StreamSession(default_model, "inf-mllm", budget=256, chunk=64, n_threads=2, memory=memory) as other:
        stream_with_needle(other, filler)
        assert len(list((tmp_path / "memory").iterdir())) == 2
    assert list((tmp_path / "memory").iterdir()) == files  # not saved: deleted with its session
    files[0].unlink()
    with pytest.warns(UserWarning, match="does not hold what was saved"):
        lost = StreamSession.restore(tmp_path / "s.npz", default_model, n_threads=2)
    with lost:
        assert lost.memory.stats.tokens_stored == 500
        ask(lost, QUESTION, 8)  # goes on
    with StreamSession(default_model, "inf-mllm", budget=256, chunk=64, n_threads=2) as plain:
        with pytest.raises(ValueError, match="memory"):
            plain.load(tmp_path / "s.npz")


def test_memory_is_on_by_default_where_it_can_work(tiny_llama):
    """The default (`memory=True`): on where the policy evicts and the budget has room for a
    reserve; off with the full policy (whatever is asked) or a budget too small for one block;
    False turns it off."""
    def memory(policy, budget, **kw):
        with StreamSession(tiny_llama, policy, budget=budget, chunk=32, n_threads=2, **kw) as s:
            return s.memory
    assert memory("inf-mllm", 128).config == MemoryConfig()
    assert memory("full", 128) is None and memory("streaming-llm", 6, sinks=1, recent=4) is None
    assert memory("full", 128, memory=MemoryConfig()) is None  # it evicts nothing: nothing to bring back
    assert memory("inf-mllm", 128, memory=False) is None and memory("inf-mllm", 128, memory=None) is None


def test_attention_probe_puts_the_cache_back(default_model, filler):
    """The attention ranking re-reads its shortlist and the query into the cache, reads the query's
    attention, and puts llama.cpp's cells back exactly; it only reorders the lexical ranking."""
    with StreamSession(default_model, "streaming-llm", budget=256, chunk=96, n_threads=2,
                       memory=MemoryConfig(ranking="attention", window=48, reserve=96)) as s:
        stream_with_needle(s, filler)
        query = s.model.tokenize(QUESTION, add_special=False)
        ids, indices = s.memory.store.arrays()
        order, starts = s.memory.rank(s.cache, query, ids, indices)
        cells, logits = s.runtime._get_cells(), s.runtime.logits()
        reranked = rerank_by_attention(s.cache, order, starts, s.memory.window, ids, query)
        assert np.array_equal(s.runtime._get_cells(), cells) and np.array_equal(s.runtime.logits(), logits)
        assert sorted(reranked.tolist()) == sorted(order.tolist()) and reranked.tolist() != order.tolist()
        assert s.cache.n_cached == s.runtime.n_cached() == 256


@pytest.mark.parametrize("model, kv, ranking", [("tiny_gemma3", "f16", "attention"), ("default_model", "q8_0", "lexical"),
                                               ("tiny_llama", "f16", "attention")])
def test_recall_on_sliding_window_and_quantized_caches(request, model, kv, ranking):
    """A run of rare tokens, evicted, is re-read when a prompt holds them: on an iSWA cache (one
    decision per token) and a quantized one, with the cache in its budget and llama.cpp agreeing."""
    path = request.getfixturevalue(model)
    rare = [90, 91, 92, 93, 94, 95]
    stream = [10 + (7 * i) % 60 for i in range(600)]
    stream[100:106] = rare
    with StreamSession(path, "streaming-llm", budget=128, chunk=32, n_threads=2, cache_type_k=kv,
                       memory=MemoryConfig(ranking=ranking, reserve=32)) as s:
        s.feed_tokens(stream)
        assert not np.isin(np.arange(100, 106), s.cached_stream_indices()).any()
        n = s.memory.read_prompt(s.cache, rare[:4], [11] * 8, s.chunk)
        (a, b), = s.memory.stats.last_recalled
        assert n == b - a and np.isin(np.arange(100, 106), s.memory.store.copy_of).all()
        # the prompt, decoded in the re-read's batch, is stored as new tokens right after the copies
        ids, indices = s.memory.store.arrays()
        assert ids[-8:].tolist() == [11] * 8 and indices[-8:].tolist() == list(range(b, b + 8))
        assert s.stats.tokens_seen == b + 8
        assert np.isin(np.arange(a, b + 8), s.cached_stream_indices()).all()  # room was made for both
        assert s.cache.n_cached <= 128 and s.runtime.n_cached() >= s.cache.n_cached


def test_images_come_back_whole_or_not_at_all():
    """Ranges that touch an image take all its cells if they fit, else none; a dropped image's
    cells are skipped; a causal image decoded in chunks is one image."""
    images = ImageStore(cap_bytes=10 ** 6)
    images.add(np.ones((6, 4)), 10, non_causal=False)
    images.add(np.ones((4, 4)), 16, non_causal=False)  # the next chunk of the same image
    images.add(np.ones((5, 4)), 30, non_causal=True)
    assert [(i.first, i.end) for i in images.images] == [(10, 20), (30, 35)]
    indices = np.arange(40)
    ids = np.arange(40)
    ids[10:20] = ids[30:35] = IMAGE_ID
    assert whole_images([(5, 12)], ids, indices, images, room=100) == [(5, 20)]
    assert whole_images([(5, 12)], ids, indices, images, room=10) == [(5, 10)]  # no room for the image: its text
    assert whole_images([(18, 33)], ids, indices, images, room=100) == [(10, 35)]
    assert whole_images([(18, 33)], ids, indices, images, room=12) == [(10, 22)]  # the image, text while room lasts
    small = ImageStore(cap_bytes=2000)
    for k, first in enumerate((0, 10, 20)):
        small.add(np.full((10, 40), k), first, non_causal=True)  # 800 bytes each in float16
    assert [i.first for i in small.images] == [10, 20] and small.dropped == 1
    ids = np.full(30, IMAGE_ID)
    assert whole_images([(0, 30)], ids, np.arange(30), small, room=100) == [(10, 30)]  # the dropped one skipped


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory):
    from infmllm_gguf.synthetic_mmproj import write_mmproj

    return write_mmproj(tmp_path_factory.mktemp("mm") / "mmproj.gguf", 576, image_size=32, patch_size=8)


def test_an_evicted_image_comes_back_with_the_words_that_name_it(default_model, mmproj, filler, tmp_path):
    """A photo shown in a user turn, 1,500 tokens of text later evicted; a question that names the
    photo re-reads it whole (its 16 cells) with its turn's words. With memory
    off nothing of it comes back; a save keeps the memory's images."""
    from PIL import Image

    photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    image_cells = {}
    for memory in (None, MemoryConfig(window=48, reserve=96)):
        with StreamSession(default_model, "streaming-llm", budget=256, chunk=64, n_threads=2, mmproj=mmproj,
                           memory=memory) as s:
            s.user_turn("Here is a photo of my red bicycle.", media=[photo], system="You are a helpful assistant.")
            s.assistant_turn("What a nice bicycle!")
            s.feed_text(filler[3000:9000])
            assert s.stats.image_cells_cached == 0
            s.user_turn("Which colour is the bicycle in my photo?")
            image_cells[memory is not None] = s.stats.image_cells_cached
            if memory is None:
                continue
            st = s.memory.stats
            assert st.images_stored == 1 and st.images_recalled == 1 and st.image_bytes == 16 * s.model.n_embd * 2
            stored = s.memory.images.images[0]
            assert np.isin(np.arange(stored.first, stored.end), s.memory.store.copy_of).all()  # whole
            s.save(tmp_path / "s.npz")
    assert image_cells == {False: 0, True: 16}, image_cells
    with StreamSession.restore(tmp_path / "s.npz", default_model, n_threads=2, mmproj=mmproj) as r:
        again = r.memory.images.images[0]
        assert again.first == stored.first and np.array_equal(again.embeddings, stored.embeddings)
        assert r.memory.stats.images_recalled == 1


def test_a_fact_each_layer_holds_only_in_part_is_re_read():
    """Per-layer eviction can leave every token of a fact in some layer and few in any one (the
    model then answers 4813 for 48213): the memory counts a block as cached only where every layer
    holds it, so the fact's block ranks; with one row (one decision for all layers) nothing changes."""
    from types import SimpleNamespace

    memory = Memory(MemoryConfig(window=8, reserve=16), budget=64)
    filler = [100 + i % 5 for i in range(64)]
    fact = [7, 8, 9, 10, 11, 12, 13, 14]
    stream = filler[:32] + fact + filler[32:]
    memory.record(Decoded(stream, np.arange(len(stream))))
    ids, indices = memory.store.arrays()
    query = [9, 11, 13]
    everything = np.arange(len(stream))
    first_half, second_half = np.arange(32, 36), np.arange(36, 40)
    per_layer = SimpleNamespace(cells=SimpleNamespace(held_by_layer=np.stack([np.setdiff1d(everything, second_half),
                                                                          np.setdiff1d(everything, first_half)])))
    order, starts = memory.rank(per_layer, query, ids, indices)
    assert order.size and starts[order[0]] == 32  # the fact's block
    whole = SimpleNamespace(cells=SimpleNamespace(held_by_layer=everything[None]))
    assert memory.rank(whole, query, ids, indices)[0].size == 0  # cached in the one row: nothing to re-read
