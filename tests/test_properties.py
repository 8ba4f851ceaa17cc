"""Properties of the pure parts, by hypothesis (random cases, shrunk to the smallest that fails):
the memory's ranking (BM25, block choice), the eviction policies beyond tests/test_policies.py's
contract matrix (per-layer decisions, the edges of the options, invariances of the rules, bad
observations), the server's turn log cut at any byte, the save format's reader given truncated or
altered files, and the sampler at any temperature.

Each test runs `max_examples` cases (`pytest --hypothesis-show-statistics` prints how many); the
file takes well under a minute on two cores. Examples are derandomized: the same cases each run.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, assume, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from infmllm_gguf.model_files import default_model_path  # noqa: E402
from infmllm_gguf.runtime import ChainSampler, Model, SamplerOptions  # noqa: E402
from infmllm_gguf.memory.ranking import block_starts, bm25, choose, held_verbatim, weighted_bm25  # noqa: E402
from infmllm_gguf.policies import H2O, InfMLLM, Observation, from_config, make_policy  # noqa: E402
from infmllm_gguf.server.journal import TurnLog, continuing  # noqa: E402
from infmllm_gguf.state import read_header, read_state, write_state  # noqa: E402

FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(FAST, max_examples=30)


# ---------------------------------------------------------------------------------------------
# ranking: BM25 and the choice of blocks

@st.composite
def memories(draw):
    """(tokens, starts, window, query) over a small vocabulary, so that blocks and query share tokens."""
    vocab = draw(st.integers(2, 30))
    tokens = np.array(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=300)), dtype=np.int64)
    window = draw(st.integers(1, 40))
    query = np.array(draw(st.lists(st.integers(0, vocab + 3), min_size=0, max_size=12)), dtype=np.int64)
    return tokens, block_starts(tokens.size, window), window, query


@FAST
@given(st.integers(0, 500), st.integers(1, 80))
def test_blocks_start_in_order_and_the_last_ends_at_the_last_token(n, window):
    starts = block_starts(n, window)
    if n == 0:
        assert starts.size == 0
        return
    assert starts[0] == 0 and np.all(np.diff(starts) > 0) and np.all(np.diff(starts) <= max(window // 2, 1))
    assert starts[-1] + window >= n and (n < window or starts[-1] + window == n) and starts[-1] >= 0


@FAST
@given(memories(), st.randoms(use_true_random=False))
def test_bm25_is_finite_non_negative_and_zero_exactly_where_nothing_matches(memory, rnd):
    tokens, starts, window, query = memory
    score, matched = bm25(tokens, starts, window, query)
    assert score.shape == matched.shape == starts.shape
    assert np.all(np.isfinite(score)) and np.all(score >= 0)
    distinct = set(query.tolist())
    for k, s in enumerate(starts):
        held = distinct & set(tokens[s:s + window].tolist())
        assert matched[k] == len(held)
        assert (score[k] > 0) == bool(held)
    # the query's order and repeats do not matter
    shuffled = list(query.tolist()) * 2
    rnd.shuffle(shuffled)
    again, matched_again = bm25(tokens, starts, window, np.array(shuffled, dtype=np.int64))
    np.testing.assert_allclose(again, score, rtol=1e-12, atol=0)
    assert np.array_equal(matched_again, matched)


@FAST
@given(memories(), st.data())
def test_a_neighbour_never_counts_more_than_the_term_itself(memory, data):
    """weighted_bm25 with weights in (0, 1] scores no block above the same terms at weight 1, and
    at weight 1 it is bm25."""
    tokens, starts, window, query = memory
    terms = sorted(set(query.tolist()))
    weights = [data.draw(st.floats(0.01, 1.0)) for _ in terms]
    weighted, matched_w = weighted_bm25(tokens, starts, window, [(np.array([t]), np.array([w]))
                                                                 for t, w in zip(terms, weights)])
    plain, matched = bm25(tokens, starts, window, query)
    assert np.all(weighted <= plain * (1 + 1e-12) + 1e-12)
    assert np.array_equal(matched_w, matched)
    # a term given as several ids (its neighbours), each at weight 1, counts as their union
    if len(terms) >= 2:
        merged, _ = weighted_bm25(tokens, starts, window, [(np.array(terms[:2]), np.ones(2))])
        union = np.where(np.isin(tokens, terms[:2]), 10 ** 6, tokens)
        expected, _ = bm25(union, starts, window, np.array([10 ** 6]))
        np.testing.assert_allclose(merged, expected, rtol=1e-12)


@FAST
@given(st.integers(1, 400), st.integers(1, 64), st.integers(0, 500), st.data())
def test_choose_takes_disjoint_sorted_ranges_of_whole_blocks_within_room(n, window, room, data):
    starts = block_starts(n, window)
    order = np.array(data.draw(st.permutations(range(starts.size))), dtype=np.int64)
    order = order[:data.draw(st.integers(0, order.size))]
    ranges = choose(order, starts, window, n, room)
    assert sum(b - a for a, b in ranges) <= room
    flat = [x for r in ranges for x in r]
    assert flat == sorted(flat) and all(a < b for a, b in ranges)
    assert all(ranges[i][1] < ranges[i + 1][0] for i in range(len(ranges) - 1))  # merged: never touching
    taken = np.zeros(n, dtype=bool)
    for a, b in ranges:
        taken[a:b] = True
    # every range is a union of whole blocks of `order`, and the first block (the best) is taken if it fits
    covered = np.zeros(n, dtype=bool)
    for k in order:
        a, b = starts[k], min(starts[k] + window, n)
        if taken[a:b].all():
            covered[a:b] = True
    assert np.array_equal(covered, taken)
    if order.size and min(window, n - starts[order[0]]) <= room:
        assert taken[starts[order[0]]:starts[order[0]] + window].all()


@FAST
@given(memories(), st.data())
def test_held_verbatim_is_all_when_everything_is_held_and_none_when_nothing_is(memory, data):
    tokens, starts, window, _ = memory
    blocks = np.arange(starts.size)
    everything = held_verbatim(tokens, np.ones(tokens.size, dtype=bool), starts, window, blocks)
    assert everything.all()
    assert not held_verbatim(tokens, np.zeros(tokens.size, dtype=bool), starts, window, blocks).any()
    skip = int(tokens[data.draw(st.integers(0, tokens.size - 1))])
    with_skip = held_verbatim(tokens, np.ones(tokens.size, dtype=bool), starts, window, blocks, skip=skip)
    assert np.array_equal(with_skip, [skip not in tokens[s:s + window] for s in starts])


# ---------------------------------------------------------------------------------------------
# policies: what tests/test_policies.py's matrix does not cover

N_LAYER = 3


@st.composite
def observations(draw, *, attention: bool = True, per_layer_indices: bool = False, integer_attention: bool = False):
    """(budget, recent, sinks, Observation) as the controller hands them over: strictly increasing
    stream indices (the stream's first tokens sometimes present), attention >= 0, visibility >= 1,
    a carried score (0 for cells new since the last eviction) or none."""
    budget = draw(st.integers(2, 40))
    sinks = draw(st.integers(0, min(5, budget - 1)))
    recent = draw(st.integers(0, budget - sinks - 1))
    n = draw(st.integers(budget + 1, 2 * budget + 8))

    def indices():
        head = draw(st.integers(0, min(6, n)))
        gaps = draw(st.lists(st.integers(1, 4), min_size=n - head, max_size=n - head))
        rest = head + np.cumsum(gaps) if gaps else np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(head), rest]).astype(np.int64)

    stream = np.stack([indices() for _ in range(N_LAYER)]) if per_layer_indices else indices()
    if not attention:
        return budget, recent, sinks, Observation(stream)
    values = st.integers(0, 64).map(float) if integer_attention else st.floats(0, 50, allow_subnormal=False)
    att = draw(hnp.arrays(np.float64, (N_LAYER, n), elements=values))
    visibility = draw(hnp.arrays(np.float64, n, elements=st.integers(1, 32).map(float)))
    carried = None
    if draw(st.booleans()):
        shape = (N_LAYER, n) if per_layer_indices else (n,)
        carried = draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 100, allow_subnormal=False)))
    return budget, recent, sinks, Observation(stream, att, visibility, carried)


def kept_protected(keep: np.ndarray, indices: np.ndarray, recent: int, sinks: int) -> bool:
    return bool(keep[indices < sinks].all() and (recent == 0 or keep[-recent:].all()))


@FAST
@given(observations(per_layer_indices=True), st.sampled_from(["inf-mllm", "h2o"]), st.data())
def test_per_layer_selection_is_each_layers_own_token_selection(case, name, data):
    """granularity "layer": `budget` cells kept in each row, its sinks and recent among them, the
    carried score [n_layer, budget]; each row is what a token decision on that layer alone keeps."""
    budget, recent, sinks, obs = case
    options = dict(budget=budget, recent=recent, sinks=sinks)
    if name == "inf-mllm":
        options |= dict(decay=data.draw(st.sampled_from([0.0, 0.5, 1.0])), max_age=data.draw(st.sampled_from([0.0, 1.0])),
                        layer_reduce=data.draw(st.sampled_from(["mean", "max"])))
    policy = make_policy(name, granularity="layer", **options)
    sel = policy.select(obs)
    n = obs.stream_indices.shape[1]
    assert sel.keep.shape == (N_LAYER, n) and sel.keep.dtype == bool
    assert sel.carried.shape == (N_LAYER, budget) and sel.carried.dtype == np.float64
    token = dataclasses.replace(policy, granularity="token")
    for layer in range(N_LAYER):
        row = sel.keep[layer]
        assert row.sum() == budget and kept_protected(row, obs.stream_indices[layer], recent, sinks)
        alone = token.select(Observation(obs.stream_indices[layer], obs.attention[layer:layer + 1], obs.visibility,
                                         None if obs.carried is None else obs.carried[layer]))
        assert np.array_equal(alone.keep, row)
        np.testing.assert_array_equal(alone.carried, sel.carried[layer])


@FAST
@given(observations(integer_attention=True), st.integers(-8, 8), st.sampled_from([0.0, 0.5]),
       st.sampled_from(["mean", "max"]))
def test_inf_mllm_does_not_depend_on_the_scale_of_attention(case, power, bias, layer_reduce):
    """Steps 2-5 normalise by the candidates' mean: attention scaled by 2^k (exact in floats) keeps
    the same cells, the carried score scaled with it (decay 0: the paper's rule)."""
    budget, recent, sinks, obs = case
    policy = InfMLLM(budget=budget, recent=recent, sinks=sinks, bias=bias, layer_reduce=layer_reduce,
                     granularity="token")
    sel = policy.select(obs)
    scaled = policy.select(dataclasses.replace(obs, attention=obs.attention * 2.0 ** power))
    assert np.array_equal(sel.keep, scaled.keep)
    np.testing.assert_array_equal(scaled.carried, sel.carried * 2.0 ** power)


@FAST
@given(observations(integer_attention=True), st.integers(0, 1000))
def test_h2o_sums_carried_and_new_attention_and_shifting_stream_indices_changes_nothing(case, shift):
    budget, recent, sinks, obs = case
    assume(obs.stream_indices[0] >= sinks)  # no sink present: the shift cannot make one
    policy = H2O(budget=budget, recent=recent, sinks=sinks)
    sel = policy.select(obs)
    expected = obs.attention.mean(axis=0) + (0 if obs.carried is None else obs.carried)
    np.testing.assert_allclose(sel.carried, expected[sel.keep], rtol=1e-12)
    moved = policy.select(dataclasses.replace(obs, stream_indices=obs.stream_indices + shift))
    assert np.array_equal(moved.keep, sel.keep)


@FAST
@given(observations(attention=False), st.sampled_from(["streaming-llm", "recent-only", "context-shift"]))
def test_position_policies_keep_a_prefix_of_sinks_and_a_suffix(case, name):
    """streaming-llm, recent-only and context-shift keep the sinks present and then the newest
    cells, nothing in between: kept cells form a prefix (of sinks) and a suffix."""
    budget, recent, sinks, obs = case
    policy = {"streaming-llm": lambda: make_policy(name, budget=budget, recent=recent, sinks=sinks),
              "recent-only": lambda: make_policy(name, budget=budget, recent=recent),
              "context-shift": lambda: make_policy(name, budget=budget, n_keep=sinks)}[name]()
    keep = policy.select(obs).keep
    indices = obs.stream_indices
    head = int(np.count_nonzero(indices < policy.sinks))
    assert keep[:head].all()
    tail = keep[head:]
    first = int(np.argmax(tail)) if tail.any() else tail.size
    assert tail[first:].all() and not tail[:first].any()


@FAST
@given(st.sampled_from(["inf-mllm", "h2o", "streaming-llm", "recent-only", "context-shift"]), st.data())
def test_a_policy_at_another_budget_is_valid_and_round_trips_its_config(name, data):
    budget = data.draw(st.integers(8, 4096))
    sinks = data.draw(st.integers(0, 6))
    options = {"context-shift": dict(n_keep=sinks), "recent-only": dict(recent=data.draw(st.integers(0, budget - 1)))
               }.get(name, dict(sinks=sinks, recent=data.draw(st.integers(0, budget - sinks - 1))))
    if name == "inf-mllm":
        options |= dict(window=data.draw(st.integers(1, 64)), bias=data.draw(st.floats(0, 4)),
                        decay=data.draw(st.floats(0, 1)), max_age=data.draw(st.floats(0, 8)),
                        layer_reduce=data.draw(st.sampled_from(["mean", "max"])),
                        granularity=data.draw(st.sampled_from(["auto", "token", "layer"])))
    policy = make_policy(name, budget=budget, **options)
    assert from_config(json.loads(json.dumps(policy.config()))) == policy
    smaller = policy.with_budget(data.draw(st.integers(sinks + 1, budget)))
    assert smaller.budget > smaller.recent + smaller.sinks or name == "context-shift"
    assert from_config(smaller.config()) == smaller


GARBAGE = st.one_of(st.none(), st.integers(-3, 3), st.floats(allow_nan=True),
                    st.just(np.arange(5)), st.just(np.ones((N_LAYER, 5))), st.just(np.arange(15).reshape(N_LAYER, 5)),
                    hnp.arrays(st.sampled_from([np.float64, np.int64, np.float32, np.bool_]),
                               hnp.array_shapes(min_dims=0, max_dims=3, max_side=6)))


@settings(FAST, max_examples=150)
@given(st.sampled_from(["inf-mllm", "h2o", "streaming-llm", "context-shift"]),
       st.sampled_from(["token", "layer"]), GARBAGE, GARBAGE, GARBAGE, GARBAGE)
def test_a_bad_observation_is_a_value_error_never_another_exception(name, granularity, indices, attention,
                                                                      visibility, carried):
    """`select` refuses what the controller could never hand over with ValueError naming it
    (base.checked's promise), whatever the shapes, dtypes and values."""
    options = dict(budget=2) | (dict(n_keep=0) if name == "context-shift" else dict(recent=0, sinks=0))
    if name in ("inf-mllm", "h2o"):
        options["granularity"] = granularity
    policy = make_policy(name, **options)
    try:
        sel = policy.select(Observation(indices, attention, visibility, carried))
    except ValueError:
        return
    assert sel.keep.dtype == bool  # accepted: then a real selection


# ---------------------------------------------------------------------------------------------
# the server's request bodies: any text JSON can carry

@FAST
@given(st.lists(st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]) | st.characters(), max_size=12).map("".join),
       st.sampled_from(["prompt", "content", "part", "stop", "stops"]))
def test_a_body_takes_exactly_the_texts_the_tokenizer_can_read(text, where):
    """JSON carries lone surrogates ("\\ud800"); UTF-8 cannot, and the tokenizer answered them with a
    UnicodeEncodeError (500). A body is valid iff its texts encode as UTF-8."""
    pydantic = pytest.importorskip("pydantic")
    from infmllm_gguf.server.api import ChatRequest, CompletionRequest

    user = {"role": "user", "content": "hi"}
    body = {"prompt": dict(prompt=text), "stop": dict(prompt="a", stop=text), "stops": dict(prompt="a", stop=["x", text]),
            "content": dict(messages=[{"role": "user", "content": text}]),
            "part": dict(messages=[user, {"role": "assistant", "content": "ok"},
                                   {"role": "user", "content": [{"type": "text", "text": text}]}])}[where]
    model = CompletionRequest if "prompt" in body else ChatRequest
    try:
        text.encode()
        readable = True
    except UnicodeEncodeError:
        readable = False
    event("a lone surrogate" if not readable else "readable")
    try:
        model.model_validate(json.loads(json.dumps(body)))
        assert readable
    except pydantic.ValidationError as exc:
        assert not readable and "lone surrogate" in str(exc)


# ---------------------------------------------------------------------------------------------
# the server's turn log: cut at any byte

@st.composite
def logs(draw):
    """Entries as the server appends them: each continues the message count the last left."""
    entries, n = [], draw(st.integers(0, 3))
    for _ in range(draw(st.integers(1, 5))):
        after = n + draw(st.integers(1, 3))
        entries.append({"before": n, "after": after, "reply": draw(st.text(max_size=20)),
                        "turns": [{"role": "user", "text": draw(st.text(max_size=20)), "images": [],
                                   "image_digests": []}]})
        n = after
    return entries


@settings(FAST, max_examples=40)
@given(logs(), st.data())
def test_a_log_cut_at_any_byte_reads_as_a_prefix_and_is_cut_back_to_it(entries, data):
    with tempfile.TemporaryDirectory() as tmp:
        log = TurnLog(Path(tmp) / "c.log")
        for entry in entries:
            log.append(entry)
        whole = log.path.read_bytes()
        cut = data.draw(st.integers(0, len(whole)))
        tail = data.draw(st.sampled_from([b"", b"\0" * 7]))  # a torn append can leave zeros behind it
        log.path.write_bytes(whole[:cut] + tail)
        read = log.entries()
        assert read == entries[:len(read)]
        complete = whole[:cut].count(b"\n")
        assert len(read) == complete
        assert log.path.read_bytes() == b"".join(whole.split(b"\n")[i] + b"\n" for i in range(complete))
        assert log.entries() == read  # cut once, stable after
        start = entries[0]["before"]
        assert continuing(read, start) == read
        log.append(entries[len(read)] if len(read) < len(entries) else entries[-1])  # appending goes on cleanly
        assert log.entries()[:len(read)] == read


# ---------------------------------------------------------------------------------------------
# the save format: truncated or altered files

def saved(tmp: Path) -> bytes:
    path = write_state(tmp / "s.npz", {"model": "m.gguf", "policy": {"name": "h2o"}},
                       {"cache": ({"n": 3}, {"ids": np.arange(7), "scores": np.linspace(0, 1, 7)}),
                        "sampler": ({"temperature": 0.5}, {})})
    return path.read_bytes()


def read_refused_with_a_value_error(path: Path) -> None:
    for read in (read_header, read_state):
        try:
            read(path)
        except ValueError as exc:
            assert str(exc)
        # anything else (zipfile.BadZipFile, EOFError, NotImplementedError) propagates: the test fails


@settings(FEWER, max_examples=25)
@given(st.data())
def test_a_state_file_cut_at_any_byte_is_refused_with_a_value_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        whole = saved(Path(tmp))
        path = Path(tmp) / "cut.npz"
        path.write_bytes(whole[:data.draw(st.integers(0, len(whole) - 1))])
        read_refused_with_a_value_error(path)


@settings(FEWER, max_examples=40)
@given(st.data())
def test_a_state_file_with_a_byte_altered_is_read_or_refused_with_a_value_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        whole = bytearray(saved(Path(tmp)))
        at = data.draw(st.integers(0, len(whole) - 1))
        whole[at] ^= data.draw(st.integers(1, 255))
        path = Path(tmp) / "altered.npz"
        path.write_bytes(bytes(whole))
        read_refused_with_a_value_error(path)


@FEWER
@given(st.data())
def test_a_state_file_whose_header_is_altered_json_is_refused_with_a_value_error(data):
    """The header is JSON inside a well-formed file: any JSON value in its place (not a record,
    no version, a newer one, components not a record, unknown arrays) is refused by name."""
    meta = data.draw(st.one_of(
        st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3)
                     | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6),
        st.fixed_dictionaries({"version": st.one_of(st.integers(-2, 5), st.text(max_size=3), st.none())}),
        st.fixed_dictionaries({"version": st.just(2), "components": st.one_of(
            st.none(), st.integers(), st.lists(st.integers(), max_size=2),
            st.dictionaries(st.text(max_size=4), st.none() | st.integers(), max_size=2))})))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.npz"
        extra = {"cache.ids": np.arange(3)} if data.draw(st.booleans()) else {}
        np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **extra)
        try:
            header, components = read_state(path)
        except ValueError as exc:
            assert str(exc)
            return
        assert isinstance(header, dict) and isinstance(components, dict)


# ---------------------------------------------------------------------------------------------
# the sampler at any temperature (llama.cpp's chain over the default model's vocabulary)

@pytest.fixture(scope="module")
def vocab_model():
    with Model(default_model_path()) as model:
        yield model


def vocab_logits(model: Model, head: np.ndarray) -> np.ndarray:
    """`head` as the logits of the vocabulary's first tokens, the rest far below."""
    logits = np.full(model.n_vocab, -1e4, dtype=np.float32)
    logits[:head.size] = head
    return logits


@FEWER
@given(hnp.arrays(np.float32, st.integers(2, 50), elements=st.floats(-30, 30, width=32)),
       st.floats(1e-300, 1e-6))
@example(np.array([1.0, 30.0, -2.0, 29.9], np.float32), 1e-38)  # where llama.cpp's division overflows to inf
def test_a_tiny_temperature_samples_greedily(vocab_model, logits, temperature):
    assume(np.sum(logits == logits.max()) == 1)
    with ChainSampler(vocab_model, SamplerOptions(temperature=temperature, seed=0)) as sample:
        assert sample(vocab_logits(vocab_model, logits)) == int(np.argmax(logits))


@FAST
@given(hnp.arrays(np.float32, st.integers(2, 50), elements=st.floats(-30, 30, width=32)),
       st.floats(1e-3, 2.0), st.floats(0.01, 1.0), st.integers(0, 10), st.floats(0, 1))
def test_the_sampler_draws_a_token_of_the_vocabulary(vocab_model, logits, temperature, top_p, top_k, min_p):
    options = SamplerOptions(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=0)
    with ChainSampler(vocab_model, options) as sample:
        token = sample(vocab_logits(vocab_model, logits))
    assert 0 <= token < logits.size
    if top_k == 1:
        assert logits[token] == logits.max()
