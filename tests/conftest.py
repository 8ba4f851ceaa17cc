"""Fixtures the test files share: the models, the command-line runner, resident memory."""
import gc
import os
import subprocess
import sys

import pytest

from infmllm_gguf.model_files import default_model_path
from infmllm_gguf.probes import rss_mib
from infmllm_gguf.state import return_freed_memory
from infmllm_gguf.synthetic import cached_model, write_model

PROMPT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
          "of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season "
          "of Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair.")


@pytest.fixture(scope="session")
def default_model():
    path = default_model_path()
    if not path.exists():
        pytest.fail(f"the default model is missing at {path}: run `make setup`")
    return path


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory):
    """Random-weight GGUF models in the shapes of real ones (`infmllm_gguf.synthetic.SHAPES`), written
    once per session: `synthetic_model("llama-1b", "q4_0")` is the path of a 1.1B llama in Q4_0."""
    root = tmp_path_factory.mktemp("synthetic")
    return lambda shape="tiny-llama", dtype="q8_0": cached_model(shape, dtype, root)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 3-layer random-weight llama in f16: quick to stream through, exact enough to compare."""
    return write_model(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", "tiny-llama", dtype="f16")


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    """A small random-weight Gemma 3 with sliding-window layers (an iSWA cache)."""
    return write_model(tmp_path_factory.mktemp("tiny") / "tiny-gemma3.gguf", "tiny-gemma3-swa", dtype="f16")


def run_cli(*args, input=None, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """`infmllm-gguf ARGS...` in a subprocess, as a user runs it; never a traceback on stderr."""
    proc = subprocess.run([sys.executable, "-m", "infmllm_gguf.cli.main", *map(str, args)], input=input, capture_output=True,
                          text=True, timeout=timeout, env=None if env is None else {**os.environ, **env})
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def rss():
    """Resident memory the test process holds now, in MiB: after a collection and with the heap
    pages glibc keeps of freed buffers handed back (raw readings swing by tens of MiB with them)."""
    def held() -> float:
        gc.collect()
        return_freed_memory()
        return rss_mib()
    return held
