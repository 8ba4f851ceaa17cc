"""Per-layer eviction: llama_attn_capture_compact keeps each layer's own tokens. The reference is
llama.cpp's own eviction (seq_rm, then seq_add and its K-shift) of the same tokens in a second
context, read back cell by cell from llama.cpp's saved state of the sequence."""
import ctypes
import struct

import numpy as np
import pytest
from llama_cpp import llama_cpp as llama

from conftest import PROMPT
from infmllm_gguf import StreamSession
from infmllm_gguf.policies import Observation, make_policy
from infmllm_gguf.runtime import Model, Runtime



def cache_rows(rt: Runtime) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions [n], K [n_layer, n, n_embd_k], V [n_layer, n, n_embd_v]) of the sequence's cells in
    cell order, parsed from llama.cpp's saved state of an f16 cache (pending shifts applied)."""
    rt.apply_pending_shifts()
    size = llama.llama_state_seq_get_size(rt.ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    assert llama.llama_state_seq_get_data(rt.ctx, buf, size, 0) == size
    data, off = bytes(buf), 0

    def take(fmt):
        nonlocal off
        values = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return values if len(values) > 1 else values[0]

    def f16(count):
        nonlocal off
        out = np.frombuffer(data, np.float16, count, off).astype(np.float32)
        off += 2 * count
        return out

    take("<I")  # llama.cpp's magic number
    assert take("<i") == 0  # the sequence
    assert take("<I") == 1  # one stream
    n = take("<I")
    positions = []
    for _ in range(n):
        pos, n_seq = take("<iI")
        take(f"<{n_seq}i")
        positions.append(pos)
    v_trans, n_layer = take("<II")
    keys = []
    for _ in range(n_layer):
        k_type, row = take("<iQ")
        assert k_type == 1  # f16
        keys.append(f16(n * row // 2).reshape(n, -1))
    values = []
    for _ in range(n_layer):
        if not v_trans:
            v_type, row = take("<iQ")
            values.append(f16(n * row // 2).reshape(n, -1))
        else:
            v_type, size_el, n_embd = take("<iII")
            values.append(f16(n * n_embd).reshape(n_embd, n).T)
        assert v_type == 1
    assert off == len(data)
    return np.array(positions), np.stack(keys), np.stack(values)


def evict_by_llama_cpp(rt: Runtime, kept: np.ndarray, n: int) -> None:
    """Keep positions `kept` of 0..n-1 as the token controller does: seq_rm each dropped run, then
    seq_add each kept run down to contiguous positions."""
    drop = np.setdiff1d(np.arange(n), kept)
    for p in drop[::-1]:
        rt.remove(int(p), int(p) + 1)
    for new, old in enumerate(kept):
        if old != new:
            rt.shift(int(old), int(old) + 1, new - int(old))


@pytest.mark.parametrize("flash_attn", [True, False])  # V stored as rows, or transposed
def test_each_layer_holds_its_own_tokens_re_rotated_as_llama_cpp_would(default_model, flash_attn):
    with Model(default_model) as m:
        toks = m.tokenize(PROMPT * 3)[:160]
        rng = np.random.default_rng(0)
        n_keep = 96
        # two kept sets: layers alternate; both keep 4 sinks and the 16 newest
        sets = [np.sort(np.concatenate((np.arange(4), rng.choice(np.arange(4, 144), n_keep - 20, replace=False),
                                        np.arange(144, 160)))) for _ in range(2)]
        keep = np.stack([sets[layer % 2] for layer in range(m.n_layer)])
        with Runtime(m, n_ctx=256, flash_attn=flash_attn) as rt:
            rt.decode(toks, range(len(toks)))
            rt.compact(keep)
            assert rt.n_cached() == n_keep and (rt.pos_min(), rt.pos_max()) == (0, n_keep - 1)
            pos, k, v = cache_rows(rt)
        np.testing.assert_array_equal(pos, np.arange(n_keep))
        for s, kept in enumerate(sets):
            with Runtime(m, n_ctx=256, flash_attn=flash_attn) as ref:
                ref.decode(toks, range(len(toks)))
                evict_by_llama_cpp(ref, kept, len(toks))
                ref_pos, ref_k, ref_v = cache_rows(ref)
            np.testing.assert_array_equal(ref_pos, np.arange(n_keep))
            layers = np.arange(s, m.n_layer, 2)
            np.testing.assert_array_equal(v[layers], ref_v[layers])  # moved, not changed
            # re-rotated in f32 then rounded to f16, where the K-shift rotates the f16 rows in place
            np.testing.assert_allclose(k[layers], ref_k[layers], rtol=2e-3, atol=2e-3)
            assert np.abs(k[layers] - ref_k[layers]).mean() < 1e-4


@pytest.mark.parametrize("kind, flash_attn", [("f16", False), ("f16", True), ("q8_0", True)])
def test_the_same_tokens_in_every_layer_give_the_token_controllers_logits(default_model, kind, flash_attn):
    with Model(default_model) as m:
        toks = m.tokenize(PROMPT * 3)[:200]
        kept = np.concatenate((np.arange(50), np.arange(120, 200)))
        logits = {}
        for how in ("token", "layer"):
            with Runtime(m, n_ctx=256, flash_attn=flash_attn, cache_type_k=kind, cache_type_v=kind) as rt:
                rt.decode(toks, range(len(toks)))
                if how == "token":
                    evict_by_llama_cpp(rt, kept, len(toks))
                    rt.state()  # packs the cells into slots 0..n-1, as the compaction does: same order of sums
                else:
                    rt.compact(np.tile(kept, (m.n_layer, 1)))
                rt.decode([toks[0]], [kept.size])
                logits[how] = rt.logits()
    np.testing.assert_array_equal(logits["layer"], logits["token"])  # bit for bit


def test_compaction_refuses_positions_the_sequence_does_not_hold(default_model):
    with Runtime(default_model, n_ctx=256) as rt:
        rt.decode(list(range(100, 164)), range(64))
        bad = np.tile(np.arange(32), (rt.model.n_layer, 1))
        bad[3, 5] = 99  # not cached
        with pytest.raises(ValueError, match="refused the compaction"):
            rt.compact(bad)
        bad[3, 5] = 4  # not ascending
        with pytest.raises(ValueError, match="refused the compaction"):
            rt.compact(bad)
        assert rt.n_cached() == 64  # nothing changed


@pytest.mark.parametrize("policy", ["inf-mllm", "h2o"])
def test_the_layer_rule_is_the_token_rule_on_each_layers_row(policy):
    """Per layer is a capability of every scoring policy: each layer's row decided alone, with its
    own carried score (H2O's accumulated attention)."""
    rng = np.random.default_rng(1)
    n_layer, n = 4, 40
    indices = np.stack([np.sort(rng.choice(200, n, replace=False)) for _ in range(n_layer)])
    attention, visibility, carried = rng.random((n_layer, n)), np.full(n, 8.0), rng.random((n_layer, n))
    per_layer = make_policy(policy, budget=24, recent=4, sinks=0, granularity="layer")
    token = make_policy(policy, budget=24, recent=4, sinks=0, granularity="token")
    selection = per_layer.select(Observation(indices, attention, visibility, carried))
    assert selection.keep.shape == (n_layer, n) and (selection.keep.sum(axis=1) == 24).all()
    for layer in range(n_layer):
        alone = token.select(Observation(indices[layer], attention[layer:layer + 1], visibility, carried[layer]))
        np.testing.assert_array_equal(selection.keep[layer], alone.keep)
        np.testing.assert_array_equal(selection.carried[layer], alone.carried)
    shared = per_layer.select(Observation(np.arange(n), attention, visibility, carried))  # the same cells in each
    assert len({tuple(k) for k in shared.keep}) > 1  # the layers chose differently


@pytest.mark.parametrize("policy", ["inf-mllm", "h2o"])
def test_a_per_layer_stream_stays_bounded_and_restores(default_model, tmp_path, policy):
    with Model(default_model) as m:
        toks = m.tokenize(PROMPT * 30)[:1200]
        with StreamSession(m, policy, budget=128, chunk=64, recent=16, sinks=4, granularity="layer") as s:
            s.feed_tokens(toks[:1000])
            rows = s.cache.cells.layer_indices
            assert rows.shape == (m.n_layer, 128) and s.runtime.n_cached() == 128
            assert np.all(np.diff(rows, axis=1) > 0)
            np.testing.assert_array_equal(rows[:, :4], np.tile(np.arange(4), (m.n_layer, 1)))  # the sinks
            np.testing.assert_array_equal(rows[:, -16:], np.tile(np.arange(984, 1000), (m.n_layer, 1)))
            assert len({tuple(r) for r in rows}) > 1  # the layers chose differently
            s.save(tmp_path / "s.npz")
            s.feed_tokens(toks[1000:1064])
            expected = s.runtime.logits()
        with StreamSession.restore(tmp_path / "s.npz", m) as r:
            np.testing.assert_array_equal(r.cache.cells.layer_indices, rows)
            r.feed_tokens(toks[1000:1064])
            np.testing.assert_array_equal(r.runtime.logits(), expected)


def test_per_layer_eviction_refuses_sliding_window_models(tiny_gemma3):
    with pytest.raises(ValueError, match="sliding-window"):
        StreamSession(tiny_gemma3, "inf-mllm", budget=128, granularity="layer")


def test_the_default_granularity_is_per_layer_where_the_cache_allows(tiny_llama, tiny_gemma3):
    for model, settled in ((tiny_llama, "layer"), (tiny_gemma3, "token")):
        with StreamSession(model, "inf-mllm", budget=64, chunk=32, recent=8) as s:
            assert s.policy.granularity == settled and s.cache.cells.per_layer == (settled == "layer")
            assert s._settings()["policy"]["granularity"] == settled  # saves and records name what ran
