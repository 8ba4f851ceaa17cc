"""Where the cache and the layers live: quantized KV caches (q8_0, q4_0) and llama.cpp's RPC backend
(layers on `rpc-server` processes on 127.0.0.1). The references are independent of the code under
test: the cell size from the GGUF's own dimensions and ggml's block sizes, the local run for RPC."""
import json
import subprocess
import sys
import textwrap
import time

import gguf
import numpy as np
import pytest

from conftest import PROMPT, run_cli
from infmllm_gguf import StreamSession
from infmllm_gguf.rpc import RpcServers, free_port, wait_listening
from infmllm_gguf.runtime import Model, Runtime

from test_stream import check_cache, kl

BLOCK = {"f16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18)}  # ggml: (values, bytes) per block


def gguf_kv_width(path) -> tuple[int, int]:
    """(n_layer, K or V values per cell and layer) from the GGUF's metadata, not llama.cpp's."""
    fields = gguf.GGUFReader(path).fields

    def value(suffix):
        f = next(f for name, f in fields.items() if name.endswith(suffix))
        return int(f.parts[f.data[0]][0])
    n_embd, n_head, n_head_kv = value(".embedding_length"), value(".attention.head_count"), \
        value(".attention.head_count_kv")
    return value(".block_count"), n_embd // n_head * n_head_kv


# -- quantized KV cache ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_a_quantized_cell_has_the_size_of_its_blocks(default_model, kind):
    n_layer, width = gguf_kv_width(default_model)
    toks = Model(default_model).tokenize(PROMPT * 4)[:256]
    sizes = {}
    for k in ("f16", kind):
        with Runtime(default_model, n_ctx=512, n_batch=256, flash_attn=True, cache_type_k=k, cache_type_v=k) as rt:
            rt.decode(toks[:128], range(128))
            before = rt.sequence_bytes()
            rt.decode(toks[128:], range(128, 256))
            sizes[k] = (rt.sequence_bytes() - before) / 128
    for k, measured in sizes.items():
        values, nbytes = BLOCK[k]
        expected = n_layer * 2 * width // values * nbytes  # K and V rows of every layer
        assert expected <= measured <= expected + 16, (k, measured, expected)  # + a cell's position and sequence


def test_quantized_cache_streams_bounded_and_close_to_recomputing(default_model):
    with Model(default_model) as m:
        toks = m.tokenize(PROMPT * 40)[:1500]
        # one decision for all layers, so that the cache is one token list to recompute (per-layer
        # compaction of a q8_0 cache: test_per_layer)
        with StreamSession(m, "inf-mllm", budget=128, chunk=64, recent=32, flash_attn=True, granularity="token",
                           cache_type_k="q8_0", cache_type_v="q8_0") as s:
            for i in range(0, len(toks), 64):
                s.feed_tokens(toks[i:i + 64])
                check_cache(s)  # within the budget, re-indexed, sinks and recent cells kept
            kept = [toks[i] for i in s.cached_stream_indices()]
            s.feed_tokens([toks[0]])
            streamed = s.runtime.logits()
        # the survivors recomputed at their new positions, in a fresh q8_0 cache
        with Runtime(m, n_ctx=256, flash_attn=True, cache_type_k="q8_0", cache_type_v="q8_0") as rt:
            rt.decode(kept + [toks[0]], range(len(kept) + 1))
            div = kl(rt.logits(), streamed)
    print(f"\nq8_0 cache, KL(recomputed || evicted+re-indexed): {div:.3e}")
    assert 0 < div < 0.5  # the f16 cache's bound (test_stream)


def test_scores_of_a_q8_0_key_cache_agree_with_f16(default_model):
    toks = Model(default_model).tokenize(PROMPT * 4)[:300]
    scores = {}
    for k in ("f16", "q8_0"):
        with Runtime(default_model, n_ctx=512, flash_attn=True, cache_type_k=k, cache_type_v=k) as rt:
            rt.capture_scores(32)
            rt.decode(toks, range(len(toks)))
            scores[k] = rt.read_scores().scores.astype(np.float64)
    r = np.corrcoef(scores["f16"].ravel(), scores["q8_0"].ravel())[0, 1]
    top = [set(np.argsort(-s.mean(axis=0))[:32]) for s in scores.values()]
    print(f"\nq8_0 vs f16 scores: pearson {r:.5f}, top-32 overlap {len(top[0] & top[1])}")
    assert r > 0.999 and len(top[0] & top[1]) >= 30


def test_quantized_v_without_flash_attention_is_refused_clearly(default_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(PROMPT)
    proc = run_cli("perplexity", default_model, "-f", text, "-p", "streaming-llm", "-b", "64", "--no-flash-attn",
                   "--cache-type-v", "q8_0", check=False)
    assert proc.returncode == 2 and "needs flash attention" in proc.stderr
    proc = run_cli("perplexity", default_model, "-f", text, "--cache-type-k", "q5_1", check=False)
    assert proc.returncode == 2 and "--cache-type-k must be one of f16, q8_0, q4_0" in proc.stderr


# -- RPC -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers():
    with RpcServers(2) as rs:
        yield rs


@pytest.mark.parametrize("flash_attn", [False, True])
def test_rpc_scores_and_logits_equal_the_local_run(default_model, servers, flash_attn):
    toks = Model(default_model).tokenize(PROMPT * 4)[:300]
    out = {}
    for where, rpc in (("local", ()), ("rpc", servers.endpoints)):
        with Model(default_model, rpc=rpc) as m, Runtime(m, n_ctx=512, n_batch=256, flash_attn=flash_attn) as rt:
            rt.capture_scores(32)
            rt.decode(toks[:256], range(256))
            first = rt.read_scores()
            rt.remove(4, 100)          # evict and re-index on the remote caches
            rt.shift(100, 256, -96)
            rt.decode(toks[256:], range(160, 160 + len(toks) - 256))
            out[where] = (first.scores, rt.read_scores().scores, rt.logits())
    for local, remote in zip(out["local"], out["rpc"]):
        np.testing.assert_allclose(remote, local, rtol=1e-3, atol=1e-4)


def test_rpc_stream_of_20k_tokens_stays_bounded(tiny_llama, servers):
    rng = np.random.default_rng(3)
    with StreamSession(tiny_llama, "inf-mllm", budget=256, chunk=256, rpc=servers.endpoints) as s:
        assert s.model.rpc == tuple(servers.endpoints)
        while s.stats.tokens_seen < 20_000:
            s.feed_tokens(rng.integers(3, 500, 256).tolist())
            assert s.runtime.n_cached() <= 256
        check_cache(s)
        assert s.stats.evictions > 70 and s.stats.capture_s > 0


def test_a_killed_rpc_server_ends_the_stream_with_a_clear_error(tiny_llama):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from infmllm_gguf import StreamSession
        with StreamSession({str(tiny_llama)!r}, budget=256, chunk=256, rpc=sys.argv[1:]) as s:
            print("streaming", flush=True)
            rng = np.random.default_rng(0)
            while True:
                s.feed_tokens(rng.integers(3, 500, 256).tolist())
        """)
    with RpcServers(2) as rs:
        proc = subprocess.Popen([sys.executable, "-c", script, *rs.endpoints], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "streaming"
        time.sleep(1.0)
        rs.kill(1)
        t0 = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
    print(f"\nexited {proc.returncode} {time.monotonic() - t0:.2f} s after the kill: {stderr.strip()}")
    assert proc.returncode == 3
    assert "rpc-server stopped answering" in stderr and "Traceback" not in stderr


def test_rpc_server_command_and_unreachable_servers(default_model, tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "infmllm_gguf.cli.main", "rpc-server", "--port", str(port), "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening("127.0.0.1", port, process=server)
        remote, local = (json.loads(run_cli("attention", default_model, "--text", PROMPT, "--window", "8", "--json",
                                            *rpc).stdout) for rpc in (["--rpc", f"127.0.0.1:{port}"], []))
        assert remote["n_layer"] == 30
        np.testing.assert_allclose(remote["scores"], local["scores"], rtol=1e-3, atol=1e-4)
    finally:
        server.terminate()
        server.wait(timeout=10)
    proc = run_cli("attention", default_model, "--text", PROMPT, "--rpc", f"127.0.0.1:{port}", check=False)
    assert proc.returncode == 2 and f"no rpc-server answers at 127.0.0.1:{port}" in proc.stderr
    proc = run_cli("attention", default_model, "--text", PROMPT, "--rpc", "localhost", check=False)
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr


def test_perplexity_records_the_cache_types(default_model, tmp_path):
    text, out = tmp_path / "t.txt", tmp_path / "runs.json"
    text.write_text(PROMPT * 10)
    proc = run_cli("perplexity", default_model, "-f", text, "-p", "streaming-llm", "-b", "128", "--chunk", "64",
                   "-ctk", "q8_0", "-ctv", "q8_0", "--json", out)
    (record,) = json.loads(out.read_text())
    assert (record["cache_type_k"], record["cache_type_v"]) == ("q8_0", "q8_0")
    assert "streaming-llm, budget 128, KV q8_0/q8_0" in proc.stdout
    assert record["peak_cells"] == 128 + 64 and 1 < record["ppl"] < 100
