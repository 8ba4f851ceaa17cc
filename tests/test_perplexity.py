"""`infmllm-gguf perplexity`: its outputs, its input checks, and agreement with independent computations."""
import csv
import gzip
import json

import numpy as np
import pytest

from conftest import run_cli
from infmllm_gguf import SessionConfig, StreamSession
from infmllm_gguf.data import shakespeare_path
from infmllm_gguf.perplexity import PerplexityRun, cumulative_ppl, file_tokens, stream_perplexity, text_blocks
from infmllm_gguf.runtime import Model

N = 700  # tokens per run: three chunks of 256 through a budget of 256 evict twice


def cli(*args, check=False):
    return run_cli("perplexity", *args, check=check)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "plays.txt"
    path.write_text(shakespeare_path().read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cli_runs(text_file, default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = cli("--file", text_file, "--policy", "inf-mllm,streaming-llm", "--budget", "256", "--bias", "0,1",
               "--max-tokens", N, "--segment", 256, "--json", out / "runs.json", "--csv", out / "runs.csv",
               "--plot", out / "runs.png", check=True)
    return proc, out


def test_json_has_one_record_per_run_with_a_curve(cli_runs):
    proc, out = cli_runs
    runs = json.loads((out / "runs.json").read_text())
    # the bias sweep applies to inf-mllm only: streaming-llm runs once; every record has its whole policy
    assert [r["policy"] for r in runs] == [
        {"name": "inf-mllm", "budget": 256, "recent": 64, "sinks": 4, "window": 32, "bias": 0.0, "decay": 0.0,
         "layer_reduce": "mean", "max_age": 2.0, "granularity": "layer"},
        {"name": "inf-mllm", "budget": 256, "recent": 64, "sinks": 4, "window": 32, "bias": 1.0, "decay": 0.0,
         "layer_reduce": "mean", "max_age": 2.0, "granularity": "layer"},
        {"name": "streaming-llm", "budget": 256, "recent": 0, "sinks": 4}]
    for r in runs:
        assert set(r) == {"model", "file", "policy", "chunk", "cache_type_k", "cache_type_v", "tokens", "ppl",
                          "tokens_per_s", "peak_cells", "peak_rss_mib", "seconds", "evict_share", "capture_share",
                          "stopped_at", "memory", "curve"}
        assert r["tokens"] == N - 1 and r["chunk"] == 256 and r["stopped_at"] is None and r["memory"] is None
        assert (r["cache_type_k"], r["cache_type_v"]) == ("f16", "f16")
        assert 5 < r["ppl"] < 200 and r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 50
        assert r["peak_cells"] == 256 + 256  # the budget plus one chunk, before each eviction
        ends = [s["tokens"] for s in r["curve"]]
        assert ends == [511, N - 1]  # segments of at least 256 tokens, whole chunks; the last one shorter
        assert all(s["cells"] <= 256 for s in r["curve"])
        run = PerplexityRun.from_json(r)  # a record reads back (model and file dropped)
        assert run.to_json() == {k: v for k, v in r.items() if k not in ("model", "file")}
        assert cumulative_ppl(run)[1][-1] == pytest.approx(r["ppl"], rel=1e-9)  # the curve adds up to the run
    assert runs[0]["ppl"] != runs[1]["ppl"]  # the bias changes what is kept
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert [float(row["ppl"]) for row in rows] == [r["ppl"] for r in runs]
    assert [(row["policy"], row["bias"], row["sinks"], row["decay"]) for row in rows] == \
        [("inf-mllm", "0.0", "4", "0.0"), ("inf-mllm", "1.0", "4", "0.0"), ("streaming-llm", "", "4", "")]
    assert (out / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in runs:  # the table on stdout
        assert f"{r['ppl']:.3f}" in proc.stdout


def test_the_command_agrees_with_a_direct_stream_session(cli_runs, text_file, default_model):
    runs = json.loads((cli_runs[1] / "runs.json").read_text())
    with StreamSession(default_model, "streaming-llm", budget=256, chunk=256) as s:
        ids = s.tokenize(text_file.read_text(encoding="utf-8"))[:N]
        nll = s.token_nll(ids)
    direct = float(np.exp(nll.mean()))
    assert runs[2]["ppl"] == pytest.approx(direct, rel=1e-6)


def test_gzip_gives_the_same_stream(text_file, default_model, tmp_path):
    gz = tmp_path / "plays.txt.gz"
    gz.write_bytes(gzip.compress(text_file.read_bytes()))
    config = SessionConfig.of("streaming-llm", budget=256, memory=False)
    a = stream_perplexity(text_file, model=default_model, config=config, max_tokens=300)
    b = stream_perplexity(gz, model=default_model, config=config, max_tokens=300)
    assert a.tokens == b.tokens == 299 and a.ppl == b.ppl


def test_blocks_tokenize_like_the_whole_text(default_model, tmp_path):
    text = shakespeare_path().read_text(encoding="utf-8")[:30_000] + "caf\u00e9 na\u00efve \u2014 end\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    blocks = list(text_blocks(path, block_bytes=2048))  # cuts fall inside multi-byte characters too
    assert len(blocks) > 10 and "".join(blocks) == text
    with Model(default_model) as m:
        assert [t for b in file_tokens(m, path) for t in b] == m.tokenize(text, add_special=True)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data"),
    (b"caf\xe9 latin-1 text\n", "not UTF-8"),
    (b"\x1f\x8b\x08\x00broken gzip", "cannot be read"),
])
def test_bad_files_are_refused_with_a_reason(tmp_path, content, message):
    path = tmp_path / ("bad.gz" if content and content.startswith(b"\x1f\x8b") else "bad.txt")
    if content is not None:
        path.write_bytes(content)
    proc = cli("--file", path, "--max-tokens", 10)
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.parametrize("args, message", [
    (("--policy", "inf-mllm,h2o", "--budget", "1024,64"), "must exceed recent"),  # h2o at 64, the last run
    (("--policy", "inf-mllm", "--budget", "512", "--recent", "64,1024"), "must exceed recent"),
    (("--policy", "h2o,H2O"), "named twice"),
    (("--policy", "inf-llm"), "unknown policy"),
    (("--policy", "streaming-llm", "--decay", "0.5"), "no policy of streaming-llm takes --decay"),
    (("--policy", "inf-mllm", "--layer-reduce", "median"), "unknown layer_reduce 'median'"),
    (("--policy", "inf-mllm", "--bias", "x"), "--bias takes a comma-separated list of floats"),
])
def test_a_bad_run_in_a_sweep_is_refused_before_the_first_run(text_file, tmp_path, args, message):
    json_out = tmp_path / "runs.json"
    proc = cli("--file", text_file, "--max-tokens", 10, "--json", json_out, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not json_out.exists()  # no run started


def test_full_matches_a_numpy_log_softmax_over_plain_llama_cpp_logits(text_file, default_model):
    """The reference: llama-cpp-python's high-level Llama, all logits of one pass, NumPy log-softmax."""
    from llama_cpp import Llama

    n = 512
    run = stream_perplexity(text_file, model=default_model, config=SessionConfig.of("full", budget=1024, chunk=128),
                            max_tokens=n)
    llm = Llama(str(default_model), n_ctx=1024, n_batch=512, logits_all=True, verbose=False)
    ids = llm.tokenize(text_file.read_text(encoding="utf-8").encode(), add_bos=True)[:n]
    llm.eval(ids)
    logits = np.asarray(llm.scores[:n], dtype=np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    reference = float(np.exp(-logp[np.arange(n - 1), ids[1:]].mean()))
    llm.close()
    assert run.tokens == n - 1
    assert run.ppl == pytest.approx(reference, rel=1e-2)


def test_a_memory_records_the_stream_and_changes_no_score(cli_runs, text_file, tmp_path):
    """No prompt, no re-reading: with --memory the scores are those of the run without it."""
    proc = cli("--file", text_file, "--policy", "streaming-llm", "--budget", "256", "--max-tokens", N,
               "--segment", 256, "--memory", "lexical", "--json", tmp_path / "memory.json", check=True)
    with_memory, = json.loads((tmp_path / "memory.json").read_text())
    without = json.loads((cli_runs[1] / "runs.json").read_text())[2]
    assert with_memory["memory"]["ranking"] == "lexical" and without["memory"] is None
    assert with_memory["ppl"] == without["ppl"]
    assert [s["ppl"] for s in with_memory["curve"]] == [s["ppl"] for s in without["curve"]]
    assert ", memory lexical" in proc.stdout  # the table says which run had one


def test_an_interrupted_run_resumes_from_its_checkpoint(text_file, default_model, tmp_path):
    ck = tmp_path / "run.npz"
    config = SessionConfig.of("inf-mllm", budget=256, chunk=128, flash_attn=False, memory=False)
    opts = dict(model=default_model, config=config, segment=128)
    # saving packs the cells (see Runtime.state), so the uninterrupted run saves on the same schedule
    whole = stream_perplexity(text_file, max_tokens=900, checkpoint=tmp_path / "whole.npz", checkpoint_every=256,
                              **opts)
    first = stream_perplexity(text_file, max_tokens=512, checkpoint=ck, checkpoint_every=256, **opts)
    fed = []
    resumed = stream_perplexity(text_file, max_tokens=900, checkpoint=ck, checkpoint_every=256,
                                progress=lambda run, done: fed.append(done), **opts)
    assert fed[0] == 512 + 128  # it went on from the checkpoint, not from the start
    assert first.tokens == 511 and resumed.tokens == whole.tokens == 899
    assert [(s.tokens, s.ppl) for s in resumed.curve] == [(s.tokens, s.ppl) for s in whole.curve]
    assert resumed.ppl == whole.ppl  # exactly: a new process continues as the first would have
    assert resumed.ppl != first.ppl
    with pytest.raises(ValueError, match="'budget': 256"):  # a checkpoint of another run is refused
        stream_perplexity(text_file, max_tokens=900, checkpoint=ck,
                          **{**opts, "config": config.replace(policy=config.policy.with_budget(384))})


def test_full_stops_where_its_cache_is_full_and_says_so(text_file, tmp_path):
    """At the default budget of 1,024 cells, on a text of more tokens: the run stops at 1,024 tokens
    with a clear message, not a traceback at 1,280."""
    proc = cli("--file", text_file, "--policy", "full", "--json", tmp_path / "full.json", check=True)
    assert "full stopped at 1024 tokens: its budget of 1024 cells is full" in proc.stderr
    (run,) = json.loads((tmp_path / "full.json").read_text())
    assert (run["tokens"], run["stopped_at"], run["peak_cells"]) == (1023, 1024, 1024)
