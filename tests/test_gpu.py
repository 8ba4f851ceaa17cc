"""Capture on a CUDA build: GPU against CPU, flash attention on and off, ubatch splits, iSWA.

Runs where llama.cpp can offload to a GPU (the device machine, `scripts/gpu_check.sh`); elsewhere
these tests are skipped. The models are synthetic random-weight GGUFs in real shapes.
"""
import os

import numpy as np
import pytest

from infmllm_gguf.runtime import Model, Runtime, supports_gpu_offload

# INFMLLM_GPU_DRY_RUN=1 runs them on a CPU build, to check the script before spending device time
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (supports_gpu_offload() or os.environ.get("INFMLLM_GPU_DRY_RUN")),
                                 reason="llama.cpp was built without GPU offload")]

W = 32
N_TOKENS = 300


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    path = os.environ.get("INFMLLM_GPU_MODEL")
    if path:
        return path
    from infmllm_gguf.synthetic import write_model
    return write_model(tmp_path_factory.mktemp("models") / "llama-1b-q8_0.gguf", "llama-1b", dtype="q8_0")


@pytest.fixture(scope="module")
def tokens(llama_1b):
    with Model(llama_1b, n_gpu_layers=0) as m:
        return np.random.default_rng(0).integers(3, m.n_vocab, N_TOKENS).tolist()


def scores(model, tokens, *, ngl, flash_attn, n_ubatch=None):
    with Runtime(model, n_ctx=512, n_ubatch=n_ubatch, n_gpu_layers=ngl, flash_attn=flash_attn) as rt:
        rt.capture_scores(W)
        rt.decode(tokens, range(len(tokens)))
        return rt.read_scores().scores, rt.logits(), rt.model.n_head


def agreement(a, b):
    corr = min(np.corrcoef(a[l], b[l])[0, 1] for l in range(a.shape[0]))
    return corr, float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_gpu_matches_cpu(llama_1b, tokens):
    cpu, cpu_logits, n_head = scores(llama_1b, tokens, ngl=0, flash_attn=False)
    for fa in (False, True):
        gpu, gpu_logits, _ = scores(llama_1b, tokens, ngl=-1, flash_attn=fa)
        corr, rel = agreement(gpu, cpu)
        print(f"\nGPU (flash_attn={fa}) vs CPU: min per-layer correlation {corr:.6f}, relative L2 {rel:.2e}, "
              f"logits max abs diff {np.abs(gpu_logits - cpu_logits).max():.3e}")
        np.testing.assert_allclose(gpu.sum(axis=1), W * n_head, rtol=1e-3)
        assert corr > 0.999 and rel < 2e-2


def test_gpu_capture_leaves_logits_unchanged(llama_1b, tokens):
    for fa in (False, True):
        _, on, _ = scores(llama_1b, tokens, ngl=-1, flash_attn=fa)
        with Runtime(llama_1b, n_ctx=512, n_gpu_layers=-1, flash_attn=fa) as rt:
            rt.decode(tokens, range(len(tokens)))
            off = rt.logits()
        np.testing.assert_array_equal(on, off)


@pytest.mark.parametrize("fa, min_corr, max_rel", [(False, 0.99999, 1e-4), (True, 0.999, 1e-2)])
def test_gpu_ubatch_split(llama_1b, tokens, fa, min_corr, max_rel):
    # flash-attention kernels depend on the batch size, so its forward differs slightly by split
    whole, _, _ = scores(llama_1b, tokens, ngl=-1, flash_attn=fa)
    split, _, _ = scores(llama_1b, tokens, ngl=-1, flash_attn=fa, n_ubatch=20)
    corr, rel = agreement(split, whole)
    print(f"\nGPU ubatch 20 vs 300 (flash_attn={fa}): min correlation {corr:.6f}, relative L2 {rel:.2e}")
    assert corr > min_corr and rel < max_rel


def test_gpu_sliding_window_model(tmp_path):
    from infmllm_gguf.synthetic import SHAPES, write_model
    shape = SHAPES["tiny-gemma3-swa"]
    path = write_model(tmp_path / "gemma3.gguf", shape, dtype="f16")
    n = 4 * shape.sliding_window
    toks = np.random.default_rng(1).integers(3, shape.n_vocab, n).tolist()
    with Runtime(path, n_ctx=512, n_gpu_layers=-1, flash_attn=True) as rt:
        rt.capture_scores(8)
        rt.decode(toks, range(n))
        got = rt.read_scores()
    # masked for every window query of a SWA layer: p_query - p_key >= n_swa for the first query
    old = got.positions <= (n - 8) - shape.sliding_window
    swa = np.array([s.sum() > 0 and not s[old].any() for s in got.scores])
    assert swa.any() and not swa.all(), "expected both sliding-window and full layers"


@pytest.mark.parametrize("fa", [False, True])
def test_gpu_per_layer_compaction_matches_cpu(llama_1b, tokens, fa):
    """llama_attn_capture_compact on CUDA: each layer keeps its own tokens (sinks, a random middle,
    the recent ones); the next chunk's scores and logits agree with the same compaction on the CPU."""
    n_first, n_keep, n_recent = 256, 128, 32
    rng = np.random.default_rng(2)
    with Model(llama_1b, n_gpu_layers=0) as m:
        n_layer = m.n_layer
    middle = [np.sort(rng.choice(np.arange(4, n_first - n_recent), n_keep - 4 - n_recent, replace=False))
              for _ in range(n_layer)]
    keep = np.stack([np.concatenate((np.arange(4), row, np.arange(n_first - n_recent, n_first))) for row in middle])
    nxt = tokens[n_first:n_first + 44]
    got = {}
    for ngl in (0, -1):
        with Runtime(llama_1b, n_ctx=512, n_gpu_layers=ngl, flash_attn=fa) as rt:
            rt.decode(tokens[:n_first], range(n_first))
            rt.compact(keep)
            assert rt.n_cached() == n_keep
            rt.capture_scores(W)
            rt.decode(nxt, range(n_keep, n_keep + len(nxt)))
            got[ngl] = rt.read_scores().scores, rt.logits()
    (cpu, cpu_logits), (gpu, gpu_logits) = got[0], got[-1]
    corr, rel = agreement(gpu, cpu)
    logits_corr = np.corrcoef(gpu_logits, cpu_logits)[0, 1]
    print(f"\nper-layer compaction, GPU (flash_attn={fa}) vs CPU: min per-layer correlation {corr:.6f}, "
          f"relative L2 {rel:.2e}, logits correlation {logits_corr:.6f}")
    assert corr > 0.999 and rel < 2e-2 and logits_corr > 0.999
