"""`infmllm-gguf chat` as a user runs it: piped (one turn per line), and on a real terminal (pexpect)."""
import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

from infmllm_gguf.synthetic_mmproj import write_mmproj

# one thread: see tests/test_multimodal.py
OPTIONS = ["--budget", "128", "--chunk", "32", "--max-tokens", "6", "--temperature", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    mmproj = write_mmproj(root / "mmproj.gguf", 576)  # 16 tokens per image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "p.png")
    frames = [Image.new("RGB", (20, 20), (i * 60, 0, 0)) for i in range(4)]
    frames[0].save(root / "a.gif", save_all=True, append_images=frames[1:], duration=500)  # 2 s
    return root


def chat(*args, lines, check=True):
    return run_cli("chat", *args, input="\n".join(lines) + "\n", check=check)


@pytest.mark.usefixtures("default_model")
def test_piped_json_session_and_load_in_a_new_process(media):
    state = media / "state.npz"
    proc = chat("--mmproj", str(media / "mmproj.gguf"), *OPTIONS, "--json", lines=[
        "Hello there!", f"/image {media / 'p.png'}", "/stats", "/frobnicate", f"/image {media / 'missing.png'}",
        f"/video {media / 'a.gif'} --fps 2", "/video", "What did you see?", f"/save {state}", "/quit",
        "never read"])
    out = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is one JSON object
    assert len(out) == 9
    hello, image, stats, unknown, missing, video, bad_video, question, saved = out
    assert hello["turn"] == 1 and hello["user"] == "Hello there!" and hello["reply"].strip()
    assert image["command"] == "image" and image["image_tokens"] == 16
    assert stats["cache"]["image_tokens_seen"] == 16 and stats["cache"]["budget"] == 128
    assert "unknown command /frobnicate" in unknown["error"]
    assert "image not found" in missing["error"]
    assert video["frames"] == 4 and video["image_tokens"] == 64
    assert "usage: /video PATH" in bad_video["error"]
    assert question["turn"] == 2 and question["reply"].strip()
    cache = question["cache"]
    assert cache["cells_cached"] <= 128 < cache["tokens_seen"] and cache["image_tokens_seen"] == 80
    assert saved == {"command": "save", "path": str(state)}

    # a new process continues the saved stream exactly where it was
    loaded, after, reply = [json.loads(line) for line in chat(
        "--mmproj", str(media / "mmproj.gguf"), *OPTIONS, "--json",
        lines=[f"/load {state}", "/stats", "Go on."]).stdout.splitlines()]
    assert loaded["cache"] == cache and after["cache"] == cache
    assert reply["reply"].strip() and reply["cache"]["tokens_seen"] > cache["tokens_seen"]


@pytest.mark.usefixtures("default_model")
def test_piped_text_prints_replies_and_errors_go_to_stderr(media):
    proc = chat(*OPTIONS, lines=["Hello!", f"/image {media / 'p.png'}", "/bogus", "Bye!"])
    assert proc.stdout.strip() and "error" not in proc.stdout  # the replies; errors go to stderr
    assert "error: unknown command /bogus" in proc.stderr
    assert "/image needs a vision projector: start chat with --mmproj PATH" in proc.stderr


@pytest.mark.usefixtures("default_model")
def test_replies_in_any_language_come_out_as_text():
    """Japanese characters take three bytes, which the tokenizer splits across tokens: the reply
    must print them, not U+FFFD for every piece."""
    proc = chat("--temperature", "0", "--max-tokens", "40", lines=['Translate "thank you" into Japanese and Russian.'])
    assert "\ufffd" not in proc.stdout
    assert re.search("[\u3040-\u30ff]", proc.stdout), proc.stdout  # kana


@pytest.mark.usefixtures("default_model")
def test_a_policy_option_the_policy_does_not_take_is_refused():
    proc = chat("--policy", "streaming-llm", "--bias", "0.3", lines=["Hello"], check=False)
    assert proc.returncode == 2 and "policy 'streaming-llm' does not take option 'bias'" in proc.stderr


@pytest.mark.usefixtures("default_model")
def test_a_projector_for_another_model_is_refused(tmp_path):
    wrong = write_mmproj(tmp_path / "wrong.gguf", 64)
    proc = chat("--mmproj", str(wrong), lines=["Hello"], check=False)
    assert proc.returncode == 2
    assert "projects images to 64 values but the model embeds tokens in 576" in proc.stderr


@pytest.mark.usefixtures("default_model")
def test_on_a_terminal_replies_stream_after_a_prompt(media):
    try:
        import pexpect
    except ImportError:
        pytest.fail("pexpect is missing: run `make setup`")
    child = pexpect.spawn(sys.executable, ["-m", "infmllm_gguf.cli.main", "chat", "--mmproj", str(media / "mmproj.gguf"), *OPTIONS],
                          encoding="utf-8", timeout=300, dimensions=(40, 200))
    try:
        child.expect("/help lists commands")
        child.expect_exact("> ")
        child.sendline(f"/image {media / 'p.png'}")
        child.expect(r"\[image p\.png: 16 tokens; cache \d+/128 cells\]")
        child.expect_exact("> ")
        child.sendline("What is in the picture?")
        child.expect(r"\r\n(.+)\r\n> ")  # the reply, then the next prompt
        assert child.match.group(1).strip()
        child.sendline("/stats")
        child.expect(r"image tokens: 16 seen")
        child.expect_exact("> ")
        child.sendline("/nope")
        child.expect("unknown command /nope")
        child.expect_exact("> ")
        child.sendeof()  # Ctrl-D leaves like /quit
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
