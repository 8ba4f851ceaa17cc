"""`infmllm-gguf attention` as a user runs it, in a subprocess; every command's help text."""
import json
import re
import resource
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROMPT, run_cli as run
from infmllm_gguf.data import shakespeare_path


@pytest.mark.usefixtures("default_model")
def test_attention_json_is_one_object_with_the_documented_schema(tmp_path):
    png = tmp_path / "map.png"
    proc = run("attention", "--text", PROMPT, "--window", "8", "--json", "--png", str(png))
    obj = json.loads(proc.stdout)  # the whole stdout is one JSON object
    assert set(obj) == {"model", "n_layer", "n_head", "window", "n_tokens", "positions", "scores"}
    assert obj["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (obj["n_layer"], obj["n_head"], obj["window"]) == (30, 9, 8)
    assert obj["positions"] == list(range(obj["n_tokens"]))
    scores = np.array(obj["scores"])
    assert scores.shape == (30, obj["n_tokens"])
    np.testing.assert_allclose(scores.sum(axis=1), 8 * 9, rtol=1e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.usefixtures("default_model")
def test_attention_summary_names_the_sink(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(PROMPT)
    out = run("attention", "--file", str(text), "--window", "4").stdout
    assert "attention sink (position 0)" in out
    assert "top 10 positions" in out


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model.gguf", "--text", "hi"], "model file not found"),
    (["--text", "short", "--window", "50"], "larger than the text"),
    (["--text", "a", "--file", "b"], "exactly one of"),
])
def test_attention_errors_are_clear(args, message):
    proc = run("attention", *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.usefixtures("default_model")
def test_a_text_longer_than_the_context_is_refused_before_a_cache_is_made(tmp_path):
    """40k tokens of Shakespeare: sized from the text, the cache would take about 1 GiB (30 layers x
    40k cells x 2 x 192 values in f16) before the text was refused."""
    long = tmp_path / "long.txt"
    long.write_text(shakespeare_path().read_text(encoding="utf-8")[:160_000], encoding="utf-8")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = run("attention", "--file", long, check=False)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert proc.returncode == 2 and "more than the model's context of 8192" in proc.stderr
    assert before / 1024 < 600 and peak_mib < 600, f"the refused command peaked at {peak_mib:.0f} MiB"

def test_truncated_and_foreign_files_are_rejected(default_model, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(default_model.read_bytes()[: 20_000_000])
    proc = run("attention", str(truncated), "--text", "hi", check=False)
    assert proc.returncode == 2 and "truncated" in proc.stderr
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("not a model")
    proc = run("attention", str(foreign), "--text", "hi", check=False)
    assert proc.returncode == 2 and "not a GGUF file" in proc.stderr


def test_an_unsupported_architecture_is_refused_with_llama_cpp_reason(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "nosucharch")
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = run("attention", str(path), "--text", "hi", check=False)
    assert proc.returncode == 2
    assert "architecture 'nosucharch'" in proc.stderr
    assert "unknown model architecture: 'nosucharch'" in proc.stderr  # llama.cpp's own words


@pytest.mark.usefixtures("default_model")
def test_llama_cpp_log_stays_quiet_unless_verbose():
    args = ("attention", "--text", PROMPT, "--window", "2")
    assert run(*args).stderr == ""  # no loader lines, no warnings
    verbose = run(*args, env={"INFMLLM_GGUF_VERBOSE": "1"}).stderr
    assert "llama_model_loader" in verbose


def words(text: str) -> str:
    return " ".join(re.sub(r"\s+", " ", text).split())


@pytest.mark.parametrize("command", ["attention", "perplexity", "bench", "chat"])
def test_help_shows_the_whole_description(command):
    """Every word of the command's description reaches --help (markup once ate "[min, max]")."""
    from infmllm_gguf.cli.main import app

    doc = next(c.callback.__doc__ for c in app.registered_commands if c.callback.__name__ == command)
    shown = run(command, "--help").stdout
    assert words(doc) in words(shown)


def test_policy_flags_come_from_the_policies_declarations():
    from infmllm_gguf.policies import declared_options

    for command in ("perplexity", "bench", "chat"):
        shown = words(run(command, "--help").stdout)
        for d in declared_options().values():
            assert "--" + d.name.replace("_", "-") in shown and words(d.help) in shown, (command, d.name)
        assert "-b, --budget" in shown and "-w, --window" in shown  # the short flags docs/RESULTS.md uses


def test_importing_the_package_leaves_llama_cpp_alone(default_model):
    """Importing every module changes no process-wide state: llama-cpp-python's own log callback
    still prints a verbose model load."""
    code = ("import importlib, pkgutil, infmllm_gguf, llama_cpp\n"
            "for m in pkgutil.walk_packages(infmllm_gguf.__path__, 'infmllm_gguf.'): importlib.import_module(m.name)\n"
            f"llama_cpp.Llama({str(default_model)!r}, n_ctx=64, vocab_only=True, verbose=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "llama_model_loader" in proc.stderr


def test_memory_flag_names_a_ranking_or_a_store():
    from infmllm_gguf.cli.common import memory_config

    assert memory_config("off") is None
    assert (memory_config("attention").ranking, memory_config("attention").store) == ("attention", "ram")
    assert (memory_config("disk").ranking, memory_config("disk").store) == ("hidden", "disk")
    assert (memory_config("ram", cap=500).ranking, memory_config("ram", cap=500).cap) == ("hidden", 500)
