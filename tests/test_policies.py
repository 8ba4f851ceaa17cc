"""Eviction policies, without a model: the contract with the cache controller on every policy,
Inf-MLLM against a loop-by-loop reference of docs/METHOD.md's rule and hand-computed cases, H2O's
sum by hand, behaviour on planted data, declarations and validation."""
from __future__ import annotations

import numpy as np
import pytest

from infmllm_gguf.policies import (POLICIES, H2O, ContextShift, Full, InfMLLM, Observation, RecentOnly,
                                   StreamingLLM, declared_options, from_config, make_policy, policy_grid)

N_LAYER = 3


# ---------------------------------------------------------------------------------------------
# helpers

def random_indices(rng: np.random.Generator, n: int, chunk: int) -> np.ndarray:
    """n stream indices, strictly increasing, with gaps among the old cells (as after earlier
    evictions), sometimes the stream's first tokens, and the last ``chunk`` contiguous."""
    n_old = n - chunk
    head = min(int(rng.integers(0, 7)), n_old)            # 0..6 first-stream tokens present
    horizon = head + n_old + int(rng.integers(0, 3 * n_old + 1))
    rest = np.sort(rng.choice(np.arange(head, horizon), size=n_old - head, replace=False))
    return np.concatenate([np.arange(head), rest, np.arange(horizon, horizon + chunk)]).astype(np.int64)


def random_case(rng: np.random.Generator, window: int = 32):
    budget = int(rng.integers(8, 80))
    recent = int(rng.integers(0, budget // 3 + 1))
    sinks = int(rng.integers(0, min(6, budget - recent)))
    n = int(rng.integers(budget + 1, 3 * budget + 2))
    chunk = int(rng.integers(1, n + 1))
    indices = random_indices(rng, n, chunk)
    attention = rng.random((N_LAYER, n)).astype(np.float32)
    # what the controller hands over for a causal chunk whose last min(window, chunk) queries were captured
    q = min(window, chunk)
    visibility = np.concatenate([np.full(n - chunk, q), np.minimum(q, chunk - np.arange(chunk))]).astype(np.float64)
    carried = None
    if rng.random() < 0.5:
        carried = rng.random(n) * rng.uniform(0.1, 10.0)
        carried[n - chunk:] = 0.0                           # new cells carry nothing yet
    return dict(budget=budget, recent=recent, sinks=sinks,
                obs=Observation(indices, attention, visibility, carried))


def reference_inf_mllm(obs: Observation, *, budget, recent, sinks, bias, decay, layer_reduce, max_age):
    """docs/METHOD.md's rule, steps 1-7, in plain Python loops."""
    ids = [int(i) for i in obs.stream_indices]
    n, n_layer = len(ids), len(obs.attention)
    s = []
    for j in range(n):
        per_layer = [float(obs.attention[l][j]) / float(obs.visibility[j]) for l in range(n_layer)]
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
        s.append(a if obs.carried is None else decay * float(obs.carried[j]) + a)
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
        if max_age and ids[-1] - ids[j] > max_age * budget:
            score[j] = -float("inf")
    chosen = set(sorted(candidates, key=lambda j: (score[j], ids[j]), reverse=True)[:budget - sum(protected)])
    keep = [protected[j] or j in chosen for j in range(n)]
    return np.array(keep), np.array([s[j] for j in range(n) if keep[j]])


# each policy that evicts, built from (budget, recent, sinks) through make_policy as a command would
BOUNDED = {
    "inf-mllm": lambda b, r, s: make_policy("inf-mllm", budget=b, recent=r, sinks=s),
    "inf-mllm-tuned": lambda b, r, s: make_policy("inf-mllm", budget=b, recent=r, sinks=s, window=8,
                                                  bias=0.7, decay=0.5, layer_reduce="max"),
    "h2o": lambda b, r, s: make_policy("h2o", budget=b, recent=r, sinks=s),
    "streaming-llm": lambda b, r, s: make_policy("streaming-llm", budget=b, recent=r, sinks=s),
    "recent-only": lambda b, r, s: make_policy("recent-only", budget=b, recent=r),
    "context-shift": lambda b, r, s: make_policy("context-shift", budget=b, n_keep=s),
}


def check_contract(policy, indices, sel):
    n = indices.size
    keep = sel.keep
    assert keep.dtype == bool and keep.shape == (n,)
    if policy.exact_budget:
        assert keep.sum() == policy.budget
    else:
        assert 1 <= keep.sum() <= policy.budget
    assert np.all(np.diff(indices[keep]) > 0)                # stream order
    if policy.recent:
        assert keep[-policy.recent:].all()                   # the recent always stay
    assert keep[indices < policy.sinks].all()                # and the sinks present
    if policy.reads_attention:
        assert sel.carried is not None and sel.carried.dtype == np.float64
        assert sel.carried.shape == (keep.sum(),)
    else:
        assert sel.carried is None


# ---------------------------------------------------------------------------------------------
# the contract, on every policy that evicts

@pytest.mark.parametrize("key", list(BOUNDED))
@pytest.mark.parametrize("seed", range(4))
def test_contract_matrix(key, seed):
    rng = np.random.default_rng(1000 + seed)
    for _ in range(10):
        case = random_case(rng)
        policy = BOUNDED[key](case["budget"], case["recent"], case["sinks"])
        obs = case["obs"]
        arrays = [x for x in (obs.stream_indices, obs.attention, obs.visibility, obs.carried) if x is not None]
        saved = [x.copy() for x in arrays]
        for x in arrays:                                     # mutation would raise
            x.setflags(write=False)

        sel = policy.select(obs)
        check_contract(policy, obs.stream_indices, sel)

        # purity: inputs untouched, same inputs -> same outputs, no state in the policy
        for x, y in zip(arrays, saved):
            np.testing.assert_array_equal(x, y)
        again = policy.select(Observation(*[None if x is None else x.copy() for x in
                                            (obs.stream_indices, obs.attention, obs.visibility, obs.carried)]))
        np.testing.assert_array_equal(again.keep, sel.keep)
        if sel.carried is not None:
            np.testing.assert_array_equal(again.carried, sel.carried)


@pytest.mark.parametrize("key", list(BOUNDED))
def test_stream_simulation(key):
    """Run each policy as the controller does: chunks arrive, select when over budget, hand the
    carried score back aligned with the survivors (new cells 0); the contract holds at every step."""
    rng = np.random.default_rng(7)
    policy = BOUNDED[key](48, 12, 4)
    indices = np.zeros(0, dtype=np.int64)
    carried = None
    next_index = 0
    for _ in range(40):
        chunk = int(rng.integers(1, 40))
        indices = np.concatenate([indices, np.arange(next_index, next_index + chunk)])
        next_index += chunk
        if carried is not None:
            carried = np.concatenate([carried, np.zeros(chunk)])
        if indices.size <= policy.budget:
            continue
        q = policy.capture_queries(chunk)
        attention = rng.random((N_LAYER, indices.size)).astype(np.float32) if q else None
        visibility = np.full(indices.size, float(q)) if q else None
        sel = policy.select(Observation(indices, attention, visibility, carried))
        check_contract(policy, indices, sel)
        indices, carried = indices[sel.keep], sel.carried
    assert indices[-1] == next_index - 1


# ---------------------------------------------------------------------------------------------
# Inf-MLLM: the loop reference and hand-computed cases

SETTINGS = [  # (bias, decay, window, layer_reduce, max_age)
    (0.0, 0.0, 32, "mean", 0.0),
    (0.5, 0.0, 32, "mean", 2.0),
    (0.0, 1.0, 8, "mean", 1.0),
    (2.0, 0.3, 4, "max", 0.5),
    (0.1, 0.9, 1, "max", 0.0),
    (0.0, 0.5, 200, "mean", 1.5),
]


@pytest.mark.parametrize("bias,decay,window,layer_reduce,max_age", SETTINGS)
def test_inf_mllm_matches_the_loop_reference(bias, decay, window, layer_reduce, max_age):
    rng = np.random.default_rng(int(bias * 100 + decay * 10 + window))
    for _ in range(15):
        case = random_case(rng, window)
        config = dict(budget=case["budget"], recent=case["recent"], sinks=case["sinks"], bias=bias, decay=decay,
                      layer_reduce=layer_reduce, max_age=max_age)
        sel = InfMLLM(window=window, **config).select(case["obs"])
        keep, carried = reference_inf_mllm(case["obs"], **config)
        np.testing.assert_array_equal(sel.keep, keep)
        np.testing.assert_allclose(sel.carried, carried, rtol=1e-12, atol=1e-15)


def test_inf_mllm_by_hand():
    """Five cells, two layers, the last one recent. Per cell, attention summed over the layers'
    queries / visibility, then the layer mean:
        cell 0: (4 + 2) / 4 / 2 = 0.75     cell 1: (1 + 1) / 4 / 2 = 0.25
        cell 2: (0 + 8) / 4 / 2 = 1.00     cell 3: (3 + 3) / 2 / 2 = 1.50 (seen by 2 queries)
        cell 4: recent
    with decay 0.5 and carried (2, 0, 0, 0, 0): S = (1.75, 0.25, 1.0, 1.5, .). Candidates 0-3:
    mean S = 4.5 / 4 = 1.125; bias 0.9 x age rank (0, 1/3, 2/3, 1):
        score = (1.556, 0.522, 1.489, 2.233): with a budget of 3, cells 3 and 0 join cell 4."""
    obs = Observation(np.array([0, 3, 7, 8, 9]), np.array([[4, 1, 0, 3, 1], [2, 1, 8, 3, 1]], dtype=np.float32),
                      np.array([4, 4, 4, 2, 1.0]), np.array([2.0, 0, 0, 0, 0]))
    no_age = dict(budget=3, recent=1, sinks=0, max_age=0.0, decay=0.5)
    sel = InfMLLM(window=4, bias=0.9, **no_age).select(obs)
    np.testing.assert_array_equal(sel.keep, [True, False, False, True, True])
    np.testing.assert_allclose(sel.carried, [1.75, 1.5, 1.0])  # cell 4: (1 + 1) / 1 / 2
    # without the bias, cell 2 (S 1.0) beats nobody either; with bias 3, the newest candidates win
    assert InfMLLM(bias=0.0, **no_age).select(obs).keep.tolist() == [True, False, False, True, True]
    assert InfMLLM(bias=3.0, **no_age).select(obs).keep.tolist() == [False, False, True, True, True]


def test_inf_mllm_age_limit_by_hand():
    """Stream indices 0, 5, 20, 21, 22, 23 with the newest at 23; budget 4, recent 1, one sink.
    Cell 0 is the sink; candidates 5, 20, 21, 22 with attention 9, 1, 2, 3 (bias 0): without an
    age limit cells 5 and 22 join the sink and cell 23. max_age 4 (x budget 4 = 16 tokens):
    cell 5 is 18 tokens old, it goes; cells 22 and 21 stay instead. The sink, 23 tokens old,
    stays: it is protected."""
    obs = Observation(np.array([0, 5, 20, 21, 22, 23]), np.array([[5, 9, 1, 2, 3, 1]], dtype=np.float32),
                      np.ones(6))
    common = dict(budget=4, recent=1, sinks=1, bias=0.0)
    assert InfMLLM(max_age=0.0, **common).select(obs).keep.tolist() == [True, True, False, False, True, True]
    assert InfMLLM(max_age=4.0, **common).select(obs).keep.tolist() == [True, False, False, True, True, True]
    # 18 tokens is within 5 budgets (20 tokens): cell 5 stays
    assert InfMLLM(max_age=5.0, **common).select(obs).keep.tolist() == [True, True, False, False, True, True]


def test_inf_mllm_divides_by_visibility_not_by_its_window():
    """Visibility is what the controller says the captured queries could see; a short last chunk
    (3 queries for a window of 32) divides by 3, not 32."""
    obs = Observation(np.arange(6), np.ones((2, 6)), np.array([3, 3, 3, 3, 2, 1.0]))
    sel = InfMLLM(budget=5, recent=1, sinks=0, window=32, bias=0.0).select(obs)
    np.testing.assert_allclose(sel.carried, [1 / 3, 1 / 3, 1 / 3, 1 / 2, 1.0])


# ---------------------------------------------------------------------------------------------
# behaviour on planted data

def test_large_bias_degenerates_to_recent_only():
    rng = np.random.default_rng(3)
    indices = random_indices(rng, 150, 40)
    obs = Observation(indices, rng.random((N_LAYER, indices.size)), np.full(indices.size, 32.0))
    for sinks, baseline in ((0, RecentOnly(budget=50)), (4, StreamingLLM(budget=50, sinks=4))):
        big = InfMLLM(budget=50, recent=10, sinks=sinks, bias=1e4).select(obs)
        np.testing.assert_array_equal(big.keep, baseline.select(Observation(indices)).keep)
    # and with no bias the choice is the attention's, not the age's
    plain = InfMLLM(budget=50, recent=10, bias=0.0).select(obs)
    assert not np.array_equal(plain.keep, RecentOnly(budget=50).select(Observation(indices)).keep)


def test_attention_saddle_is_kept():
    rng = np.random.default_rng(4)
    indices = np.arange(200, dtype=np.int64)
    attention = (rng.random((N_LAYER, indices.size)) * 0.01).astype(np.float32)
    saddle = 20                                          # an old token, far out of the window
    attention[:, saddle] = 1.0                           # high attention in every layer
    obs = Observation(indices, attention, np.full(indices.size, 32.0))
    assert InfMLLM(budget=50, recent=16, bias=0.0, max_age=0.0).select(obs).keep[saddle]
    # the age limit (2 budgets: 100 tokens) lets it go at 179 tokens old, and keeps a younger one
    assert not InfMLLM(budget=50, recent=16, bias=0.0, max_age=2.0).select(obs).keep[saddle]
    attention[:, 120] = 1.0
    assert InfMLLM(budget=50, recent=16, bias=0.0, max_age=2.0).select(obs).keep[120]
    assert not RecentOnly(budget=50).select(Observation(indices)).keep[saddle]


def test_h2o_sums_by_hand():
    """H2O's score is the layer mean of the raw attention plus what it carried: no visibility.
        cell:      0     1     2     3     4 (recent)
        layers:  (2,4) (1,1) (0,2) (6,0) (1,1)  -> mean 3, 1, 1, 3, 1
        carried:   1     5     0     0     0    -> S = 4, 6, 1, 3, 1
    Budget 3: cell 4 (recent), then cells 1 (6) and 0 (4)."""
    obs = Observation(np.arange(5), np.array([[2, 1, 0, 6, 1], [4, 1, 2, 0, 1]], dtype=np.float32),
                      np.array([1, 1, 1, 1, 1.0]), np.array([1.0, 5, 0, 0, 0]))
    sel = H2O(budget=3, recent=1).select(obs)
    np.testing.assert_array_equal(sel.keep, [True, True, False, False, True])
    np.testing.assert_array_equal(sel.carried, [4.0, 6.0, 1.0])


def test_inf_mllm_forgets_what_h2o_remembers():
    rng = np.random.default_rng(5)
    indices = np.arange(120, dtype=np.int64)
    attention = (0.5 + 0.5 * rng.random((N_LAYER, indices.size))).astype(np.float32)
    heavy = 30
    attention[:, heavy] = 0.0                           # ignored by the last chunk...
    carried = rng.random(indices.size)
    carried[heavy] = 100.0                              # ...but heavy in the earlier ones
    carried[-20:] = 0.0                                 # the last chunk's cells are new
    obs = Observation(indices, attention, np.full(indices.size, 20.0), carried)
    assert H2O(budget=40, recent=10).select(obs).keep[heavy]
    # the paper's local window (decay 0) forgets it; with decay 1 InfMLLM keeps it too
    assert not InfMLLM(budget=40, recent=10, decay=0.0, max_age=0.0).select(obs).keep[heavy]
    assert InfMLLM(budget=40, recent=10, decay=1.0, max_age=0.0).select(obs).keep[heavy]


def test_ties_prefer_newer():
    indices = np.arange(100, dtype=np.int64)
    obs = Observation(indices, np.ones((N_LAYER, indices.size)), np.full(indices.size, 4.0))
    want = np.zeros(indices.size, dtype=bool)
    want[-30:] = True
    np.testing.assert_array_equal(InfMLLM(budget=30, recent=5, sinks=0, window=4, bias=0.0).select(obs).keep, want)
    np.testing.assert_array_equal(H2O(budget=30, recent=5).select(obs).keep, want)


def test_context_shift_is_llama_cpp_arithmetic():
    policy = ContextShift(budget=20, n_keep=4)
    for n in (21, 25, 30, 31):                          # one shift suffices
        keep = policy.select(Observation(np.arange(n))).keep
        n_discard = (n - 4) // 2                         # llama.cpp: n_discard = n_left/2
        want = np.ones(n, dtype=bool)
        want[4:4 + n_discard] = False                    # seq_rm(n_keep, n_keep + n_discard)
        np.testing.assert_array_equal(keep, want)
    # after earlier shifts (gaps), and a big chunk: halve again until it fits
    indices = np.concatenate([np.arange(4), np.arange(50, 146)])   # n_left 96
    keep = policy.select(Observation(indices)).keep
    assert keep[:4].all() and keep.sum() == 4 + 12      # 96 -> 48 -> 24 -> 12
    np.testing.assert_array_equal(indices[keep][4:], np.arange(134, 146))
    # fewer first tokens present than n_keep: those present stay
    keep = policy.select(Observation(np.concatenate([[0, 1], np.arange(10, 40)]))).keep
    assert keep[:2].all() and keep.sum() == 2 + 15


def test_streaming_llm_keeps_sinks_and_recent():
    indices = np.concatenate([np.arange(4), np.arange(100, 160)])
    keep = StreamingLLM(budget=20).select(Observation(indices)).keep
    np.testing.assert_array_equal(indices[keep], np.concatenate([np.arange(4), np.arange(144, 160)]))


def test_what_each_policy_asks_of_the_controller():
    assert InfMLLM(window=32).capture_queries(256) == 32 and InfMLLM(window=32).capture_queries(1) == 1
    assert H2O().capture_queries(256) == 256
    for cls in (StreamingLLM, RecentOnly, ContextShift, Full):
        assert not cls.reads_attention and cls().capture_queries(256) == 0
    assert InfMLLM.reads_attention and H2O.reads_attention
    assert H2O().accumulates_attention and InfMLLM(decay=0.5).accumulates_attention
    assert not InfMLLM(decay=0.0).accumulates_attention
    with pytest.raises(ValueError, match=r"window \(64\) must not exceed chunk \(32\)"):
        InfMLLM(window=64).check_chunk(32)


def test_full_never_evicts():
    with pytest.raises(RuntimeError, match=r"stream \(130 tokens\) outgrew the budget of 128 cells with policy "
                                           r"'full'; raise --budget or use a bounded policy"):
        Full(budget=128).select(Observation(np.arange(130)))


# ---------------------------------------------------------------------------------------------
# declarations, configs, validation

def test_registry_and_declarations():
    assert set(POLICIES) == {"inf-mllm", "h2o", "streaming-llm", "recent-only", "context-shift", "full"}
    for name, cls in POLICIES.items():
        assert cls.name == name and cls.__doc__
    for cls, arxiv in ((InfMLLM, "2409.09086"), (H2O, "2306.14048"), (StreamingLLM, "2309.17453")):
        assert arxiv in cls.__doc__
    assert InfMLLM().config() == {"name": "inf-mllm", "budget": 1024, "recent": 64, "sinks": 4, "window": 32,
                                  "bias": 0.5, "decay": 0.0, "layer_reduce": "mean", "max_age": 2.0, "granularity": "auto"}
    assert StreamingLLM().config() == {"name": "streaming-llm", "budget": 1024, "recent": 0, "sinks": 4}
    assert ContextShift(budget=512).config() == {"name": "context-shift", "budget": 512, "n_keep": 4}
    declared = declared_options()
    assert list(declared) == ["budget", "recent", "sinks", "window", "bias", "decay", "layer_reduce", "max_age",
                              "granularity", "n_keep"]
    assert declared["granularity"].defaults == {"inf-mllm": "auto", "h2o": "token"}
    assert declared["recent"].defaults == {"inf-mllm": 64, "h2o": 64, "streaming-llm": 0, "recent-only": 0}
    assert declared["bias"].type is float and declared["layer_reduce"].type is str
    assert declared["sinks"].describe() == ("the first tokens of the stream, always kept while cached "
                                            "(default inf-mllm, streaming-llm: 4; h2o: 0)")
    assert declared["budget"].describe() == "cells the cache keeps (default 1024)"


def test_a_config_builds_the_same_policy_and_labels_what_differs():
    policy = make_policy("inf-mllm", budget=256, bias=1.0, decay=0.25, layer_reduce="max")
    assert from_config(policy.config()) == policy
    assert policy.label() == "inf-mllm, budget 256, bias 1, decay 0.25, layer_reduce max"
    assert make_policy("streaming_llm", budget=256, sinks=2).sinks == 2     # underscores accepted
    # a record written before the age limit existed ran without one, and is labelled so
    old = from_config({"name": "inf-mllm", "budget": 512, "recent": 64, "sinks": 0, "window": 32, "bias": 0.5,
                       "decay": 0.0, "layer_reduce": "mean"})
    assert old.max_age == 0.0 and old.label() == "inf-mllm, budget 512, sinks 0, max_age 0, granularity token"
    assert old.granularity == "token"  # and before per-layer eviction existed, one decision for all layers


def test_the_grid_crosses_only_the_options_a_policy_takes():
    grid = policy_grid(["H2O", "inf-mllm"], {"budget": [256, 512], "bias": [0, 1], "window": []})
    assert [p.label() for p in grid] == ["h2o, budget 256", "h2o, budget 512", "inf-mllm, budget 256, bias 0",
                                         "inf-mllm, budget 256, bias 1", "inf-mllm, budget 512, bias 0",
                                         "inf-mllm, budget 512, bias 1"]
    with pytest.raises(ValueError, match="named twice"):
        policy_grid(["h2o", "H2O"])
    with pytest.raises(ValueError, match=r"no policy of streaming-llm, h2o takes --bias"):
        policy_grid(["streaming-llm", "h2o"], {"bias": [0.5]})
    with pytest.raises(ValueError, match="must exceed recent"):
        policy_grid(["inf-mllm", "h2o"], {"budget": [1024, 64]})


@pytest.mark.parametrize("name,config,fix", [
    ("inf-mllm", dict(budget=64, recent=60), r"budget \(64\) must exceed recent \+ sinks \(64\): "
                                             r"raise --budget or lower --recent/--sinks"),
    ("inf-mllm", dict(budget=100, recent=64, sinks=40), r"budget \(100\) must exceed recent \+ sinks \(104\)"),
    ("streaming-llm", dict(budget=4), r"budget \(4\) must exceed recent \+ sinks \(4\)"),
    ("context-shift", dict(budget=4, n_keep=4), r"budget \(4\) must exceed n_keep \(4\): raise --budget or lower --n-keep"),
    ("inf-mllm", dict(budget=512, bias=-0.1), r"bias must be >= 0 .*--bias"),
    ("inf-mllm", dict(budget=512, bias=float("nan")), r"bias must be a finite number"),
    ("inf-mllm", dict(budget=512, decay=1.5), r"decay must be in \[0, 1\] .*--decay"),
    ("inf-mllm", dict(budget=512, window=0), r"window must be >= 1 .*--window"),
    ("inf-mllm", dict(budget=512, layer_reduce="median"), r"unknown layer_reduce 'median': pass --layer-reduce mean or max"),
    ("h2o", dict(budget=512, recent=-1), r"recent must be >= 0 .*--recent"),
    ("h2o", dict(budget=0), r"budget must be >= 1"),
    ("h2o", dict(budget=100.5), r"budget must be an integer"),
    ("h2o", dict(budget=True), r"budget must be an integer"),
    ("recent-only", dict(budget=512, sinks=4), r"policy 'recent-only' does not take option 'sinks' \(--sinks\); "
                                               r"its options: budget, recent"),
    ("streaming-llm", dict(budget=512, bias=0.5), r"policy 'streaming-llm' does not take option 'bias'"),
    ("quantum", dict(budget=512), r"unknown policy 'quantum': choose one of inf-mllm, h2o, streaming-llm, "
                                  r"recent-only, context-shift, full"),
])
def test_validation_errors(name, config, fix):
    with pytest.raises(ValueError, match=fix):
        make_policy(name, **config)


def test_select_rejects_bad_observations():
    policy = InfMLLM(budget=10, recent=2)
    indices, attention, visibility = np.arange(20), np.ones((2, 20)), np.full(20, 4.0)
    for obs, message in [
        (Observation(np.arange(10), attention[:, :10], visibility[:10]), "more cells"),
        (Observation(indices), "reads attention"),
        (Observation(indices, attention[:, :19], visibility), "attention must be"),
        (Observation(indices, attention, visibility[:19]), "visibility must be aligned"),
        (Observation(indices, attention, np.zeros(20)), "visibility must be at least 1"),
        (Observation(indices, attention, visibility, np.zeros(19)), "carried must be aligned"),
        (Observation(indices[::-1].copy(), attention, visibility), "strictly increasing"),
        (Observation(indices, np.full((2, 20), np.inf), visibility), "non-finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            policy.select(obs)
