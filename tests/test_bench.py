"""`infmllm-gguf bench`: its JSON schema with real values, the figures' arithmetic by hand, the targets,
the synthetic-model fixture. No timing is asserted: speed is what the benchmark reports, not what a test
expects."""
import json
from dataclasses import astuple

import gguf
import numpy as np
import pytest

from conftest import run_cli
from infmllm_gguf.bench.figures import figures
from infmllm_gguf.bench.stream import StreamBench, StreamRun, StreamSummary, bounded_by_context, stream_bench, unshifted
from infmllm_gguf.cli.bench import TARGETS, against_targets
from infmllm_gguf.policies import make_policy, policy_grid
from infmllm_gguf.runtime import Runtime
from infmllm_gguf.segments import Segment
from infmllm_gguf.synthetic import SHAPES, _tensor_specs, cached_model

BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}  # per 32 weights: f16 scale + codes


def bench(*args, home, check=True):
    # synthetic models land in a temporary cache
    return run_cli("bench", *args, env={"INFMLLM_GGUF_HOME": str(home)}, check=check, timeout=300)


# -- the synthetic-model fixture ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_synthetic_fixture_writes_the_shape_and_quant_type(synthetic_model, dtype):
    s = SHAPES["tiny-llama"]
    path = synthetic_model("tiny-llama", dtype)
    r = gguf.GGUFReader(path)

    def field(key):
        return int(r.fields[key].parts[-1][0])

    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert (field("llama.block_count"), field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
            field("llama.embedding_length"), field("llama.feed_forward_length")) == (3, 4, 2, 64, 128)
    tensors = {t.name: t for t in r.tensors}
    hd = s.n_embd // s.n_head
    # ggml order: {fan-in, fan-out}
    assert [int(x) for x in tensors["token_embd.weight"].shape] == [64, 512]
    assert [int(x) for x in tensors["blk.2.attn_k.weight"].shape] == [64, s.n_head_kv * hd]
    assert [int(x) for x in tensors["blk.0.ffn_down.weight"].shape] == [128, 64]
    want = gguf.GGMLQuantizationType.Q8_0 if dtype == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    data = 0
    for t in tensors.values():
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            data += 4 * int(t.n_elements)
        else:
            assert t.tensor_type == want
            data += int(t.n_elements) // 32 * BLOCK_BYTES[dtype]
        assert int(t.n_bytes) > 0
    assert sum(int(t.n_bytes) for t in tensors.values()) == data
    assert data == sum(int(np.prod(shape)) * (4 if len(shape) == 1 else BLOCK_BYTES[dtype] / 32)
                       for _, shape, _ in _tensor_specs(s))
    # the rest of the file is the header, metadata and a 512-token vocabulary, aligned
    assert 0 < path.stat().st_size - data < 64 * 1024


def test_synthetic_fixture_loads_in_llama_cpp_and_is_written_once(synthetic_model):
    path = synthetic_model("tiny-llama", "q4_0")
    stamp = path.stat().st_mtime_ns
    assert synthetic_model("tiny-llama", "q4_0") == path and path.stat().st_mtime_ns == stamp
    assert not list(path.parent.glob("*.part*"))
    s = SHAPES["tiny-llama"]
    with Runtime(path, n_ctx=256, n_gpu_layers=0, n_threads=1) as rt:
        m = rt.model
        assert (m.n_layer, m.n_head, m.n_embd, m.n_vocab, m.n_ctx_train) == \
            (s.n_layer, s.n_head, s.n_embd, s.n_vocab, s.n_ctx_train)
        rt.decode(list(range(3, 67)))
        assert np.isfinite(rt.logits()).all()
    with pytest.raises(ValueError, match="unknown synthetic shape"):
        cached_model("llama-3b")


# -- the figures' arithmetic -------------------------------------------------------------------
def run_of(seconds, rss, policy="inf-mllm", repeat=0, evict_s=0.5):
    segs = [Segment(100 * (i + 1), t, t, 50, m, None, evict_s / len(seconds), 0.0)
            for i, (t, m) in enumerate(zip(seconds, rss))]
    return StreamRun(make_policy(policy, budget=64, recent=8).config(), repeat, 100 * len(seconds), None, sum(seconds), 0.0,
                     evict_s, 0.0, 114, 100 * len(seconds) - 64, rss[0], segs)


def test_first_and_last_tenth_memory_growth_and_figures():
    # 20 segments of 100 tokens: the first two take 0.1 s, the rest 0.2 s; memory grows 20% after them
    seconds = [0.1, 0.1] + [0.2] * 18
    rss = [100.0, 100.0] + [105.0] * 17 + [120.0]
    run = run_of(seconds, rss)
    assert run.tenth == 2
    assert run.first_last() == pytest.approx((1000.0, 500.0))
    assert run.rate(0, 20) == pytest.approx(2000 / 3.8)
    assert run.peak("rss_mib", first_tenth=True) == 100.0 and run.peak("rss_mib") == 120.0
    assert run.peak("gpu_mib") is None
    flat = run_of([0.2] * 20, [100.0] * 20, repeat=1)
    slow = run_of([0.4] * 20, [100.0] * 20, repeat=2)
    s = StreamSummary.of([run, flat, slow])
    # tokens/s of the three repeats: 2000 / 3.8 = 526.3, 2000 / 4 = 500, 2000 / 8 = 250: median 500
    assert astuple(s.tokens_per_s) == pytest.approx((500.0, 250.0, 2000 / 3.8))
    assert astuple(s.last_vs_first) == pytest.approx((1.0, 0.5, 1.0))
    assert astuple(s.rss_growth) == pytest.approx((0.0, 0.0, 0.2))
    assert s.evict_ms_per_1k.median == pytest.approx(250.0)  # 0.5 s per 2000 tokens
    assert s.evict_share.max == pytest.approx(0.5 / 3.8) and s.gpu_peak_mib is None

    h2o = [run_of([0.4] * 20, [100.0] * 20, "h2o", r, evict_s=0.1) for r in (0, 1)]
    sb = StreamBench("m", "CPU", "random", 2000, 100, 100, 2, True, None, [run, flat] + h2o)
    (sp,) = sb.speedups()  # paired within a repeat: 8 s / 3.8 s and 8 s / 4 s
    assert (sp["budget"], sp["inf_mllm"], sp["h2o"]) == (64, "inf-mllm, budget 64, recent 8", "h2o, budget 64, recent 8")
    assert astuple(sp["inf_mllm_over_h2o"]) == pytest.approx(((8 / 3.8 + 2) / 2, 2.0, 8 / 3.8))
    got = {(f["figure"], f["policy"]): f["value"] for f in figures(None, sb)}
    assert got == pytest.approx({
        ("eviction + re-indexing share of stream time", "inf-mllm"): (0.5 / 3.8 + 0.5 / 4) / 2,
        ("tokens/s, last 10% of the stream / first 10%", "inf-mllm"): 0.75,
        ("peak RSS growth after the first 10%", "inf-mllm"): 0.1,
        ("eviction + re-indexing share of stream time", "h2o"): 0.1 / 8,
        ("tokens/s, last 10% of the stream / first 10%", "h2o"): 1.0,
        ("peak RSS growth after the first 10%", "h2o"): 0.0,
        ("inf-mllm / h2o tokens/s", "inf-mllm"): (8 / 3.8 + 2) / 2,
    })


def test_targets_by_hand():
    measured = [{"figure": "capture overhead, decode", "run": None, "policy": None, "budget": None, "value": 0.126},
                {"figure": "capture overhead, prefill", "run": None, "policy": None, "budget": None, "value": 0.002},
                {"figure": "inf-mllm / h2o tokens/s", "run": "inf-mllm, budget 64", "policy": "inf-mllm",
                 "budget": 64, "value": 2.0},
                {"figure": "tokens/s, last 10% of the stream / first 10%", "run": "h2o, budget 64", "policy": "h2o",
                 "budget": 64, "value": 0.94},
                {"figure": "streaming-llm / plain llama.cpp tokens/s", "run": "streaming-llm, budget 64",
                 "policy": "streaming-llm", "budget": 64, "value": 0.965},
                {"figure": "inf-mllm / plain llama.cpp tokens/s", "run": "inf-mllm, budget 64",
                 "policy": "inf-mllm", "budget": 64, "value": 0.965},
                {"figure": "memory on / off tokens/s", "run": "m", "policy": "inf-mllm", "budget": 64, "value": 0.89},
                {"figure": "first answer token, memory on / off", "run": "m", "policy": "inf-mllm", "budget": 64,
                 "value": 2.0}]
    assert [(t["target"], t["op"], t["limit"], t["met"]) for t in against_targets(measured)] == [
        ("capture overhead, decode", "<=", 0.03, False),                  # +12.6% against 3%
        ("capture overhead, prefill", "<=", 0.03, True),
        ("inf-mllm / h2o tokens/s", ">=", 2.0, True),                     # exactly at the limit
        ("tokens/s, last 10% of the stream / first 10%", ">=", 0.95, False),
        ("streaming-llm / plain llama.cpp tokens/s", ">=", 0.97, False),  # the baseline's own rule: 3% at most
        ("inf-mllm / plain llama.cpp tokens/s", ">=", 0.95, True),        # the default: 5% at most
        ("memory on / off tokens/s", ">=", 0.9, False),
        ("first answer token, memory on / off", "<=", 2.0, True)]
    assert len(TARGETS) == 10


def test_full_runs_once_in_the_context():
    grid = policy_grid(["inf-mllm", "full", "H2O"], {"budget": [256, 512]})
    assert [p.label() for p in bounded_by_context(grid, 2048)] == [
        "inf-mllm, budget 256", "inf-mllm, budget 512", "full, budget 2048", "h2o, budget 256", "h2o, budget 512"]


def test_stream_without_reindexing_keeps_the_budget(synthetic_model):
    sb = stream_bench(synthetic_model(), policies=[make_policy("streaming-llm", budget=256), make_policy("inf-mllm", budget=256)],
                      tokens=1000, chunk=128, segment=200, repeats=1, source="random", reindex=False, baseline=False,
                      n_gpu_layers=0, n_threads=1)
    assert not sb.reindex and (sb.segment, sb.tokens) == (256, 1024)  # whole chunks, whole segments
    for run in sb.runs:
        assert [g.tokens for g in run.segments] == [256, 512, 768, 1024]
        assert [g.cells for g in run.segments] == [256] * 4 and run.cells_evicted == 1024 - 256
    assert sb.runs[1].policy["granularity"] == "token"  # positions kept: nothing to compact per layer


def test_without_reindexing_auto_decides_once_and_layer_is_refused():
    assert unshifted(make_policy("inf-mllm")).granularity == "token"
    assert unshifted(make_policy("streaming-llm")) == make_policy("streaming-llm")
    with pytest.raises(ValueError, match="--granularity token"):
        unshifted(make_policy("inf-mllm", granularity="layer"))


def test_full_stops_at_the_training_context_inside_a_segment(synthetic_model):
    sb = stream_bench(synthetic_model(), policies=[make_policy("full")], tokens=2500, chunk=128, segment=768,
                      repeats=1, source="random", n_gpu_layers=0, n_threads=1)  # full alone: no baseline
    (run,) = sb.runs
    assert sb.tokens == 3072 and (run.policy["budget"], run.tokens, run.stopped_at) == (2048, 2048, 2048)
    assert [g.tokens for g in run.segments] == [768, 1536, 2048] == [g.cells for g in run.segments]


# -- the command -------------------------------------------------------------------------------
def test_bench_json_has_the_documented_schema(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = bench("--synthetic", "tiny-llama", "--policy", "inf-mllm,h2o,full", "--budget", "256", "--tokens", "2500",
                 "--chunk", "128", "--segment", "256", "--repeats", "2", "--prompt-tokens", "256",
                 "--decode-tokens", "8", "--threads", "1", "-ngl", "0", "--json", str(out), "--plot", str(png),
                 home=tmp_path)
    assert (tmp_path / "synthetic" / "tiny-llama-q8_0.gguf").exists()
    assert "capture overhead" in proc.stdout and "inf-mllm, budget 256, granularity layer / h2o, budget 256" in proc.stdout
    obj = json.loads(out.read_text())
    assert set(obj) == {"capture", "stream", "kv", "rpc", "memory", "targets"}
    assert obj["kv"] is obj["rpc"] is obj["memory"] is None

    cap = obj["capture"]
    assert set(cap) == {"model", "device", "prompt_tokens", "chunk", "decode_tokens", "capture_queries",
                        "generation_headroom", "decode_read_steps", "prefill_off", "prefill_on", "decode_off",
                        "decode_on", "decode_every_on", "prefill_overhead", "decode_overhead", "decode_every_overhead"}
    assert (cap["model"], cap["prompt_tokens"], cap["chunk"], cap["decode_tokens"], cap["capture_queries"]) == \
        ("tiny-llama-q8_0.gguf", 256, 128, 8, 32)
    # generation evicts every chunk's worth of steps; the default policy reads the last window (32) of them
    assert (cap["generation_headroom"], cap["decode_read_steps"]) == (128, 32)
    assert cap["device"].startswith("CPU (") and cap["device"].endswith("1 threads)")
    for key in ("prefill_off", "prefill_on", "decode_off", "decode_on", "decode_every_on"):
        assert 0 < cap[key]["min"] <= cap[key]["median"] <= cap[key]["max"]

    st = obj["stream"]
    assert set(st) == {"model", "device", "source", "tokens", "chunk", "segment", "repeats", "reindex",
                       "gpu_memory_scope", "summary", "speedups", "over_baseline", "runs"}
    assert (st["tokens"], st["chunk"], st["segment"], st["repeats"], st["source"], st["reindex"]) == \
        (2560, 128, 256, 2, "random", True)
    assert st["gpu_memory_scope"] is None  # CPU
    runs = st["runs"]
    # every record carries its policy's whole configuration; interleaved: the second repeat starts one run later
    assert runs[0]["policy"] == {"name": "inf-mllm", "budget": 256, "recent": 64, "sinks": 4, "window": 32,
                                 "bias": 0.5, "decay": 0.0, "layer_reduce": "mean", "max_age": 2.0, "granularity": "layer"}
    plain = "plain llama.cpp"  # the baseline, one per budget
    assert [(r["policy"]["name"], r["repeat"]) for r in runs] == \
        [("inf-mllm", 0), ("h2o", 0), ("full", 0), (plain, 0), ("h2o", 1), ("full", 1), (plain, 1), ("inf-mllm", 1)]
    assert runs[3]["policy"] == {"name": plain, "budget": 256, "sinks": 4}
    for r in runs:
        ends = [g["tokens"] for g in r["segments"]]
        assert ends == list(range(256, r["tokens"] + 1, 256))
        assert set(r["segments"][0]) == {"tokens", "seconds", "cpu_s", "cells", "rss_mib", "gpu_mib", "evict_s",
                                         "capture_s", "ppl"}
        assert 0 < r["decode_s"] <= r["seconds"] and 0 <= r["evict_s"] < r["seconds"]
        assert all(g["rss_mib"] > 10 and g["gpu_mib"] is None and g["ppl"] is None for g in r["segments"])
        if r["policy"]["name"] == "full":  # tiny-llama's training context is 2048 tokens
            assert (r["policy"]["budget"], r["tokens"], r["stopped_at"], r["cells_evicted"], r["peak_cells"]) == \
                (2048, 2048, 2048, 0, 2048)
            assert [g["cells"] for g in r["segments"]] == ends and r["evict_s"] == 0
        else:
            assert (r["policy"]["budget"], r["tokens"], r["stopped_at"]) == (256, 2560, None)
            assert (r["peak_cells"], r["cells_evicted"]) == (256 + 128, 2560 - 256)
            assert [g["cells"] for g in r["segments"]] == [256] * 10
            assert r["evict_s"] > 0 and (r["capture_s"] > 0) == (r["policy"]["name"] != plain)

    assert [s["policy"]["name"] for s in st["summary"]] == ["inf-mllm", "h2o", "full", plain]
    inf = "inf-mllm, budget 256, granularity layer"  # the default granularity, settled for this model
    assert [(b["run"], b["budget"]) for b in st["over_baseline"]] == [(inf, 256), ("h2o, budget 256", 256)]
    for b in st["over_baseline"]:  # paired within each repeat
        pairs = [(r, p) for r in runs for p in runs if r["policy"]["name"] == b["policy"]
                 and p["policy"]["name"] == plain and r["repeat"] == p["repeat"]]
        ratios = sorted((r["tokens"] / r["seconds"]) / (p["tokens"] / p["seconds"]) for r, p in pairs)
        assert (b["over_plain"]["min"], b["over_plain"]["max"]) == pytest.approx((ratios[0], ratios[-1]))
    for s in st["summary"]:
        for key in ("tokens_per_s", "last_vs_first", "evict_share", "rss_peak_mib"):
            assert s[key]["min"] <= s[key]["median"] <= s[key]["max"]
    (sp,) = st["speedups"]
    assert (sp["budget"], sp["inf_mllm"], sp["h2o"]) == (256, inf, "h2o, budget 256")

    assert [(t["target"], t["run"]) for t in obj["targets"]] == \
        [("capture overhead, prefill", None), ("capture overhead, decode", None)] + [
        (t, run) for run in (inf, "h2o, budget 256") for t in ("eviction + re-indexing share of stream time",
                                                               "tokens/s, last 10% of the stream / first 10%",
                                                               "peak RSS growth after the first 10%")] + \
        [("inf-mllm / h2o tokens/s", inf), ("inf-mllm / plain llama.cpp tokens/s", inf)]
    assert all(set(t) == {"target", "run", "policy", "budget", "value", "op", "limit", "met"} for t in obj["targets"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_bench_prices_the_memory_beside_no_memory(default_model, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--only", "memory", "--budget", "256", "--tokens", "512", "--memory-tokens", "5000",
                   "--questions", "2", "--repeats", "1", "--threads", "2", "--json", str(out), timeout=300)
    assert "first answer token, 5,000 tokens in memory" in proc.stdout
    obj = json.loads(out.read_text())
    memory = obj["memory"]
    # the default ranking keeps 66 bytes of hidden state per token (64 int8, a float16 scale)
    # beside the 12 of the token
    assert (memory["memory_tokens"], memory["questions"], memory["host_bytes_per_token"]) == (5000, 2, 78)
    assert memory["correct_off"] == 0 < memory["correct_on"]  # the needles are 1,500+ tokens back
    assert memory["tokens_per_s_off"]["median"] > 0 and memory["first_token_s_on"]["median"] > 0
    assert {t["target"] for t in obj["targets"]} == {"memory on / off tokens/s", "first answer token, memory on / off"}


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "tiny-llama", "--policy", "inf-llm"], "unknown policy"),
    (["--synthetic", "tiny-llama", "--policy", "h2o", "--budget", "64"], "must exceed recent"),
    (["--synthetic", "tiny-llama", "--budget", "big"], "comma-separated"),
    (["--synthetic", "llama-3b"], "unknown synthetic shape"),
    (["--synthetic", "tiny-llama", "--synthetic-dtype", "q5_k"], "--synthetic-dtype"),
    (["model.gguf", "--synthetic", "tiny-llama"], "not both"),
    (["--only", "speed"], "--only takes"),
    (["--only", "capture", "--plot", "x.png"], "add stream"),
    (["--capture-queries", "64", "--chunk", "32"], "must not exceed the chunk"),
    (["--synthetic", "tiny-llama", "--window", "64", "--chunk", "32"], "must not exceed chunk"),
    (["--synthetic", "tiny-llama", "--policy", "streaming-llm", "--bias", "0.3"], "no policy of streaming-llm takes --bias"),
    (["/nonexistent/model.gguf", "--only", "capture"], "model file not found"),
])
def test_bench_errors_are_clear(tmp_path, args, message):
    proc = bench(*args, home=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "synthetic").exists()  # rejected before any model is written
