"""Eviction policies, without a model: the contract with the cache controller, InfMLLM against an
independent loop-by-loop reference of METHOD.md's rule, behaviour on planted data, validation."""
from __future__ import annotations

import numpy as np
import pytest

from infmllm_gguf.policies import (POLICIES, H2O, ContextShift, Full, InfMLLM, StreamingLLM, Window,
                                   make_policy, options)

N_LAYER = 3


# ---------------------------------------------------------------------------------------------
# helpers

def random_ids(rng: np.random.Generator, n: int, chunk: int) -> np.ndarray:
    """n stream indices, strictly increasing, with gaps among the old cells (as after earlier
    evictions), sometimes the stream's first tokens, and the last ``chunk`` contiguous."""
    n_old = n - chunk
    head = min(int(rng.integers(0, 7)), n_old)            # 0..6 first-stream tokens present
    horizon = head + n_old + int(rng.integers(0, 3 * n_old + 1))
    rest = np.sort(rng.choice(np.arange(head, horizon), size=n_old - head, replace=False))
    ids = np.concatenate([np.arange(head), rest, np.arange(horizon, horizon + chunk)])
    return ids.astype(np.int64)


def random_case(rng: np.random.Generator):
    budget = int(rng.integers(8, 80))
    recent = int(rng.integers(0, budget // 3 + 1))
    sinks = int(rng.integers(0, min(6, budget - recent)))
    n = int(rng.integers(budget + 1, 3 * budget + 2))
    chunk = int(rng.integers(1, n + 1))
    ids = random_ids(rng, n, chunk)
    attention = rng.random((N_LAYER, n)).astype(np.float32)
    if rng.random() < 0.5:
        memory = None
    else:
        memory = rng.random(n) * rng.uniform(0.1, 10.0)
        memory[n - chunk:] = 0.0                           # new cells carry no memory yet
    return dict(budget=budget, recent=recent, sinks=sinks, ids=ids, attention=attention,
                memory=memory, chunk=chunk)


def reference_inf_mllm(ids, attention, memory, *, budget, recent, sinks, window, bias, decay,
                       layer_reduce):
    """METHOD.md's "ours, precisely", steps 1-6, in plain Python loops."""
    ids = [int(i) for i in ids]
    n = len(ids)
    n_layer = len(attention)
    s = []
    for j in range(n):
        n_visible = min(window, ids[-1] - ids[j] + 1)
        per_layer = [float(attention[l][j]) / n_visible for l in range(n_layer)]
        if layer_reduce == "mean":
            total = 0.0
            for v in per_layer:
                total += v
            a = total / n_layer
        else:
            a = per_layer[0]
            for v in per_layer[1:]:
                if v > a:
                    a = v
        s.append(a if memory is None else decay * float(memory[j]) + a)
    protected = [ids[j] < sinks or j >= n - recent for j in range(n)]
    candidates = [j for j in range(n) if not protected[j]]
    mean = 0.0
    for j in candidates:
        mean += s[j]
    mean /= len(candidates)
    score = {}
    for r, j in enumerate(candidates):
        rank = r / (len(candidates) - 1) if len(candidates) > 1 else 0.0
        score[j] = (s[j] / mean if mean > 0 else s[j]) + bias * rank
    k = budget - sum(protected)
    chosen = set(sorted(candidates, key=lambda j: (score[j], ids[j]), reverse=True)[:k])
    keep = [protected[j] or j in chosen for j in range(n)]
    return np.array(keep), np.array([s[j] for j in range(n) if keep[j]])


# each bounded policy, built from (budget, recent, sinks) through make_policy as a CLI would
BOUNDED = {
    "inf-mllm": lambda b, r, s: make_policy("inf-mllm", budget=b, recent=r, sinks=s),
    "inf-mllm-tuned": lambda b, r, s: make_policy("inf-mllm", budget=b, recent=r, sinks=s, window=8,
                                                  bias=0.7, decay=0.5, layer_reduce="max"),
    "h2o": lambda b, r, s: make_policy("h2o", budget=b, recent=r, sinks=s),
    "streaming-llm": lambda b, r, s: make_policy("streaming-llm", budget=b, recent=r, sinks=s),
    "window": lambda b, r, s: make_policy("window", budget=b, recent=r, sinks=None),
    "context-shift": lambda b, r, s: make_policy("context-shift", budget=b, recent=None, n_keep=s),
}


def expected_memory(policy, case, keep):
    """The accumulated score S the policy must hand back for the kept cells, or None."""
    if isinstance(policy, InfMLLM):
        _, mem = reference_inf_mllm(case["ids"], case["attention"], case["memory"], budget=policy.budget,
                                    recent=policy.recent, sinks=policy.sinks, window=policy.window,
                                    bias=policy.bias, decay=policy.decay, layer_reduce=policy.layer_reduce)
        return mem
    if isinstance(policy, H2O):
        s = case["attention"].astype(np.float64).mean(axis=0)
        if case["memory"] is not None:
            s = s + case["memory"]
        return s[keep]
    return None


def check_contract(policy, ids, sel):
    n = ids.size
    keep = sel.keep
    assert keep.dtype == bool and keep.shape == (n,)
    if policy.exact_budget:
        assert keep.sum() == policy.budget
    else:
        assert 1 <= keep.sum() <= policy.budget
    survivors = ids[keep]
    assert np.all(np.diff(survivors) > 0)                   # stream order
    if policy.recent:
        assert keep[-policy.recent:].all()                   # the recent always stay
    assert keep[ids < policy.sinks].all()                    # and the sinks present
    if policy.needs_attention:
        assert sel.memory is not None and sel.memory.dtype == np.float64
        assert sel.memory.shape == (keep.sum(),)
    else:
        assert sel.memory is None


# ---------------------------------------------------------------------------------------------
# the contract, on every bounded policy

@pytest.mark.parametrize("key", list(BOUNDED))
@pytest.mark.parametrize("seed", range(4))
def test_contract_matrix(key, seed):
    rng = np.random.default_rng(1000 + seed)
    for _ in range(10):
        case = random_case(rng)
        policy = BOUNDED[key](case["budget"], case["recent"], case["sinks"])
        attention = case["attention"] if policy.needs_attention else None
        memory = case["memory"] if policy.needs_attention else None
        saved = [None if x is None else x.copy() for x in (case["ids"], attention, memory)]
        for x in (case["ids"], attention, memory):           # mutation would raise
            if x is not None:
                x.setflags(write=False)

        sel = policy.select(case["ids"], attention, memory)
        check_contract(policy, case["ids"], sel)

        # memory is aligned with the kept cells: S of each survivor
        want = expected_memory(policy, case, sel.keep)
        if want is not None:
            np.testing.assert_allclose(sel.memory, want, rtol=1e-12, atol=1e-15)

        # purity: inputs untouched, same inputs -> same outputs, no state in the policy
        for x, y in zip((case["ids"], attention, memory), saved):
            if x is not None:
                np.testing.assert_array_equal(x, y)
        again = policy.select(saved[0].copy(), None if saved[1] is None else saved[1].copy(),
                              None if saved[2] is None else saved[2].copy())
        np.testing.assert_array_equal(again.keep, sel.keep)
        if sel.memory is not None:
            np.testing.assert_array_equal(again.memory, sel.memory)


@pytest.mark.parametrize("key", list(BOUNDED))
def test_stream_simulation(key):
    """Run each policy as the controller will: chunks arrive, select when over budget, carry the
    memory to the survivors (new cells get 0); the contract holds at every step."""
    rng = np.random.default_rng(7)
    policy = BOUNDED[key](48, 12, 4)
    ids = np.zeros(0, dtype=np.int64)
    memory = None
    next_id = 0
    for _ in range(40):
        chunk = int(rng.integers(1, 40))
        new = np.arange(next_id, next_id + chunk)
        next_id += chunk
        ids = np.concatenate([ids, new])
        if memory is not None:
            memory = np.concatenate([memory, np.zeros(chunk)])
        if ids.size <= policy.budget:
            continue
        window = policy.capture_window(chunk)
        attention = rng.random((N_LAYER, ids.size)).astype(np.float32) if window else None
        sel = policy.select(ids, attention, memory)
        check_contract(policy, ids, sel)
        ids, memory = ids[sel.keep], sel.memory
    assert ids[-1] == next_id - 1


# ---------------------------------------------------------------------------------------------
# InfMLLM against the loop reference

SETTINGS = [  # (bias, decay, window, layer_reduce)
    (0.0, 0.0, 32, "mean"),
    (0.5, 0.0, 32, "mean"),
    (0.0, 1.0, 8, "mean"),
    (2.0, 0.3, 4, "max"),
    (0.1, 0.9, 1, "max"),
    (0.0, 0.5, 200, "mean"),
]


@pytest.mark.parametrize("bias,decay,window,layer_reduce", SETTINGS)
def test_inf_mllm_matches_reference(bias, decay, window, layer_reduce):
    rng = np.random.default_rng(int(bias * 100 + decay * 10 + window))
    for _ in range(15):
        case = random_case(rng)
        policy = InfMLLM(budget=case["budget"], recent=case["recent"], sinks=case["sinks"], window=window,
                         bias=bias, decay=decay, layer_reduce=layer_reduce)
        sel = policy.select(case["ids"], case["attention"], case["memory"])
        keep, memory = reference_inf_mllm(case["ids"], case["attention"], case["memory"],
                                          budget=case["budget"], recent=case["recent"], sinks=case["sinks"],
                                          window=window, bias=bias, decay=decay, layer_reduce=layer_reduce)
        np.testing.assert_array_equal(sel.keep, keep)
        np.testing.assert_allclose(sel.memory, memory, rtol=1e-12, atol=1e-15)


def test_inf_mllm_visibility_average():
    """A key inside the window is divided by the queries that see it; older keys by the window."""
    ids = np.array([0, 5, 9, 10, 11, 12, 13], dtype=np.int64)
    attention = np.ones((2, ids.size), dtype=np.float32)
    sel = InfMLLM(budget=6, recent=1, window=4).select(ids, attention, None)
    s = np.empty(ids.size)
    s[sel.keep] = sel.memory
    # distances to the last query: 13, 8, 4, 3, 2, 1, 0 -> n_visible 4, 4, 4, 4, 3, 2, 1
    n_visible = np.array([4, 4, 4, 4, 3, 2, 1])
    np.testing.assert_allclose(s[sel.keep], (1.0 / n_visible)[sel.keep])


# ---------------------------------------------------------------------------------------------
# behaviour on planted data

def test_large_bias_degenerates_to_a_window():
    rng = np.random.default_rng(3)
    ids = random_ids(rng, 150, 40)
    attention = rng.random((N_LAYER, ids.size)).astype(np.float32)
    for sinks, baseline in ((0, Window(budget=50)), (4, StreamingLLM(budget=50, sinks=4))):
        big = InfMLLM(budget=50, recent=10, sinks=sinks, bias=1e4).select(ids, attention, None)
        np.testing.assert_array_equal(big.keep, baseline.select(ids, None, None).keep)
    # and with no bias the choice is the attention's, not the age's
    plain = InfMLLM(budget=50, recent=10, bias=0.0).select(ids, attention, None)
    assert not np.array_equal(plain.keep, Window(budget=50).select(ids, None, None).keep)


def test_attention_saddle_is_kept():
    rng = np.random.default_rng(4)
    ids = np.arange(200, dtype=np.int64)
    attention = (rng.random((N_LAYER, ids.size)) * 0.01).astype(np.float32)
    saddle = 20                                          # an old token, far out of the window
    attention[:, saddle] = 1.0                          # high attention in every layer
    policy = InfMLLM(budget=50, recent=16, bias=0.0)
    assert policy.select(ids, attention, None).keep[saddle]
    assert not Window(budget=50).select(ids, None, None).keep[saddle]


def test_h2o_keeps_an_earlier_heavy_hitter():
    rng = np.random.default_rng(5)
    ids = np.arange(120, dtype=np.int64)
    attention = (0.5 + 0.5 * rng.random((N_LAYER, ids.size))).astype(np.float32)
    heavy = 30
    attention[:, heavy] = 0.0                           # ignored by the last chunk...
    memory = rng.random(ids.size)
    memory[heavy] = 100.0                               # ...but heavy in the earlier ones
    memory[-20:] = 0.0                                  # the last chunk's cells are new
    assert H2O(budget=40, recent=10).select(ids, attention, memory).keep[heavy]
    # the paper's local window (decay 0) forgets it; with decay 1 InfMLLM keeps it too
    assert not InfMLLM(budget=40, recent=10, decay=0.0).select(ids, attention, memory).keep[heavy]
    assert InfMLLM(budget=40, recent=10, decay=1.0).select(ids, attention, memory).keep[heavy]


def test_ties_prefer_newer():
    ids = np.arange(100, dtype=np.int64)
    attention = np.ones((N_LAYER, ids.size), dtype=np.float32)
    want = np.zeros(ids.size, dtype=bool)
    want[-30:] = True
    # inf-mllm: keys out of the window all score 1/window; the newer ones must win
    np.testing.assert_array_equal(InfMLLM(budget=30, recent=5, window=4).select(ids, attention, None).keep, want)
    np.testing.assert_array_equal(H2O(budget=30, recent=5).select(ids, attention, None).keep, want)


def test_context_shift_is_llama_cpp_arithmetic():
    policy = ContextShift(budget=20, n_keep=4)
    for n in (21, 25, 30, 31):                          # one shift suffices
        ids = np.arange(n, dtype=np.int64)
        keep = policy.select(ids, None, None).keep
        n_left = n - 4
        n_discard = n_left // 2                          # llama.cpp: n_discard = n_left/2
        want = np.ones(n, dtype=bool)
        want[4:4 + n_discard] = False                    # seq_rm(n_keep, n_keep + n_discard)
        np.testing.assert_array_equal(keep, want)
        assert keep.sum() <= policy.budget              # at most budget, not exactly
    # after earlier shifts (gaps in ids), and a big chunk: halve again until it fits
    ids = np.concatenate([np.arange(4), np.arange(50, 146)]).astype(np.int64)   # n_left 96
    keep = policy.select(ids, None, None).keep
    assert keep[:4].all() and keep.sum() == 4 + 12      # 96 -> 48 -> 24 -> 12
    np.testing.assert_array_equal(ids[keep][4:], np.arange(134, 146))
    # fewer first tokens present than n_keep: those present stay
    ids = np.concatenate([[0, 1], np.arange(10, 40)]).astype(np.int64)
    keep = policy.select(ids, None, None).keep
    assert keep[:2].all() and keep.sum() == 2 + 15


def test_streaming_llm_keeps_sinks_and_recent():
    ids = np.concatenate([np.arange(4), np.arange(100, 160)]).astype(np.int64)
    keep = StreamingLLM(budget=20).select(ids, None, None).keep
    np.testing.assert_array_equal(ids[keep], np.concatenate([np.arange(4), np.arange(144, 160)]))


def test_capture_windows():
    assert InfMLLM(budget=100, window=32).capture_window(256) == 32
    assert InfMLLM(budget=100, window=32).capture_window(1) == 1
    assert H2O(budget=100).capture_window(256) == 256
    for cls in (StreamingLLM, Window, ContextShift, Full):
        policy = cls(budget=100)
        assert policy.capture_window(256) == 0 and not policy.needs_attention
    assert InfMLLM(budget=100).needs_attention and H2O(budget=100).needs_attention


def test_full_never_evicts():
    with pytest.raises(RuntimeError, match=r"stream \(130 tokens\) outgrew the context with policy 'full'; "
                                           r"use a bounded policy"):
        Full(budget=128).select(np.arange(130), None, None)


# ---------------------------------------------------------------------------------------------
# validation and construction

def test_registry():
    assert set(POLICIES) == {"inf-mllm", "h2o", "streaming-llm", "window", "context-shift", "full"}
    for name, cls in POLICIES.items():
        assert cls.name == name and cls.__doc__
    for cls, arxiv in ((InfMLLM, "2409.09086"), (H2O, "2306.14048"), (StreamingLLM, "2309.17453")):
        assert arxiv in cls.__doc__
    defaults = InfMLLM(budget=512)
    assert (defaults.window, defaults.bias, defaults.decay, defaults.recent, defaults.sinks,
            defaults.layer_reduce) == (32, 0.5, 0.0, 64, 0, "mean")
    assert StreamingLLM(budget=512).sinks == 4 and ContextShift(budget=512).sinks == 4


@pytest.mark.parametrize("name,config,fix", [
    ("inf-mllm", dict(budget=64, recent=64), r"budget \(64\) must exceed recent \+ sinks \(64\): "
                                             r"raise --budget or lower --recent/--sinks"),
    ("inf-mllm", dict(budget=100, recent=64, sinks=40), r"budget \(100\) must exceed recent \+ sinks \(104\)"),
    ("streaming-llm", dict(budget=4), r"budget \(4\) must exceed recent \+ sinks \(4\)"),
    ("context-shift", dict(budget=4, n_keep=4), r"budget \(4\) must exceed n_keep \(4\): raise --budget or lower --n-keep"),
    ("inf-mllm", dict(budget=512, bias=-0.1), r"bias must be >= 0 .*--bias"),
    ("inf-mllm", dict(budget=512, decay=1.5), r"decay must be in \[0, 1\] .*--decay"),
    ("inf-mllm", dict(budget=512, decay=-0.5), r"decay must be in \[0, 1\]"),
    ("inf-mllm", dict(budget=512, window=0), r"window must be >= 1 .*--window"),
    ("inf-mllm", dict(budget=512, layer_reduce="median"), r"unknown layer reduction 'median': pass --layer-reduce mean or max"),
    ("h2o", dict(budget=512, recent=-1), r"recent must be >= 0 .*--recent"),
    ("h2o", dict(budget=-5), r"budget must be >= 0"),
    ("h2o", dict(budget=100.5), r"budget must be an integer"),
    ("window", dict(budget=512, sinks=4), r"policy 'window' does not take option 'sinks' \(--sinks\); its options: budget, recent"),
    ("streaming-llm", dict(budget=512, bias=0.5), r"policy 'streaming-llm' does not take option 'bias'"),
    ("h2o", dict(recent=8), r"policy 'h2o' needs a budget: pass --budget"),
    ("quantum", dict(budget=512), r"unknown policy 'quantum': choose one of inf-mllm, h2o, streaming-llm, window, "
                                  r"context-shift, full"),
])
def test_validation_errors(name, config, fix):
    with pytest.raises(ValueError, match=fix):
        make_policy(name, **config)


def test_make_policy_ignores_none_options():
    cli = dict(budget=256, recent=None, sinks=None, window=None, bias=None, decay=None, layer_reduce=None,
               n_keep=None)
    for name in POLICIES:
        policy = make_policy(name, **cli)
        assert policy.budget == 256 and policy.name == name
    assert make_policy("streaming_llm", budget=256, sinks=2).sinks == 2     # underscores accepted
    assert options("context-shift") == ("budget", "n_keep")


def test_select_rejects_bad_inputs():
    policy = InfMLLM(budget=10, recent=2)
    ids = np.arange(20)
    attention = np.ones((2, 20), dtype=np.float32)
    with pytest.raises(ValueError, match="more cells"):
        policy.select(np.arange(10), attention[:, :10], None)
    with pytest.raises(ValueError, match="needs attention"):
        policy.select(ids, None, None)
    with pytest.raises(ValueError, match="attention must be"):
        policy.select(ids, attention[:, :19], None)
    with pytest.raises(ValueError, match="memory must be aligned"):
        policy.select(ids, attention, np.zeros(19))
    with pytest.raises(ValueError, match="strictly increasing"):
        policy.select(ids[::-1].copy(), attention, None)
