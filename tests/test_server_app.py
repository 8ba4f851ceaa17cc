"""The application `infmllm-gguf serve` makes, in the test process (`server_process.in_process`:
FastAPI's TestClient, no process, no port): the shapes of its replies, streamed and not, its
errors, its conversations on disk and in the memory. The real process over HTTP, clients that
leave, faults and the browser are in test_server.py and test_server_faults.py."""
import base64
import io
import statistics
import time

import numpy as np
import pytest
from PIL import Image

from infmllm_gguf import StreamSession
from infmllm_gguf.synthetic_mmproj import write_mmproj
from server_process import ARGS, SETTINGS, THREADS, events, in_process, reference_replies

TURNS = ["Name a colour.", "Name an animal.", "Name a fruit."]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    """One in-process server for the tests that only read its replies."""
    with in_process(ARGS, tmp_path_factory.mktemp("state")) as s:
        yield s


def chat(messages, **extra):
    return {"messages": [{"role": "user", "content": m} for m in messages], "max_tokens": 6, "temperature": 0,
            **extra}


def test_chat_replies_have_openais_shapes(server, default_model):
    expected = reference_replies(default_model, TURNS[:1], max_tokens=6)[0]
    status, r, headers = server.post("/v1/chat/completions", chat(TURNS[:1], logprobs=True, top_logprobs=2))
    assert status == 200 and headers["x-session-id"] == r["session_id"]
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion" and isinstance(r["created"], int)
    assert r["model"] == "SmolLM2-135M-Instruct.Q4_1"
    choice = r["choices"][0]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] in ("stop", "length")
    entry = choice["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
    assert entry["bytes"] == list(entry["token"].encode()) and entry["logprob"] == entry["top_logprobs"][0]["logprob"]
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] > 0
    assert set(r["cache"]) == {"cells_cached", "budget", "tokens_seen", "cells_evicted"}

    status, text, headers = server.post("/v1/chat/completions", chat(TURNS[:1], stream=True, logprobs=True,
                                                                     stream_options={"include_usage": True}))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    *chunks, done = events(text)
    assert done == "[DONE]" and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    pieces, last, tally = chunks[1:-2], chunks[-2], chunks[-1]
    assert "".join(c["choices"][0]["delta"]["content"] for c in pieces) == expected
    assert all(c["choices"][0]["finish_reason"] is None and c["choices"][0]["logprobs"]["content"] for c in pieces)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert isinstance(last["session_id"], str) and set(last["cache"]) == set(r["cache"])
    assert tally["choices"] == [] and tally["usage"]["completion_tokens"] == r["usage"]["completion_tokens"]


def test_completion_replies_have_openais_shapes(server, default_model):
    prompt = "The capital of France is"
    with StreamSession(default_model, flash_attn=False, n_threads=1, **SETTINGS) as s:
        expected = "".join(s.generate(prompt, max_tokens=6, temperature=0))
    status, r, _ = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                   "logprobs": 2})
    assert status == 200 and r["id"].startswith("cmpl-") and r["object"] == "text_completion"
    choice = r["choices"][0]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"} and choice["text"] == expected
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
    assert "".join(lp["tokens"]) == expected and lp["text_offset"][0] == 0
    assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"]])[:-1])
    assert all(len(top) <= 2 for top in lp["top_logprobs"])

    status, text, _ = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                      "logprobs": 2, "stream": True})
    *chunks, done = events(text)
    assert status == 200 and done == "[DONE]" and {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    streamed = [o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert streamed == lp["text_offset"]  # counted on from one chunk to the next
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"] and chunks[-1]["choices"][0]["text"] == ""


def reply_text(r: dict) -> str:
    choice = r["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_a_negative_seed_is_a_random_seed_on_both_routes(server):
    """llama-cpp-python's seed -1 ("random"); OpenAI takes any integer. Was: 500, "expected
    non-negative integer"."""
    sampled = dict(max_tokens=4, temperature=1.0)
    for route, body in (("/v1/chat/completions", chat(["Hello"], **sampled)),
                        ("/v1/completions", {"prompt": "Once upon a time", **sampled})):
        for stream in (False, True):
            status, r, _ = server.post(route, {**body, "seed": -1, "stream": stream})
            assert status == 200, r
            if stream:
                assert events(r)[-1] == "[DONE]" and not any("error" in e for e in events(r)[:-1])
        texts = {reply_text(server.post(route, {**body, "seed": 42})[1]) for _ in range(2)}
        assert len(texts) == 1  # a seed of its own: the same draws


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": "abc"}, "seed"),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
])
def test_a_body_that_does_not_validate_answers_400_as_openai_does(server, body, param):
    """Was 422 (FastAPI's default)."""
    status, err, _ = server.post("/v1/chat/completions", body)
    assert status == 400 and set(err) == {"error"} and set(err["error"]) == ERROR_KEYS, err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param
    assert err["error"]["message"].startswith(param)
    status, err, _ = server.post("/v1/completions", {"prompt": "hi", "n": 2})
    assert status == 400 and err["error"]["param"] == "n"


def png_data_url(seed=0) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url, text="What is this?"):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


def test_bad_requests_are_refused_and_the_server_goes_on(default_model, tmp_path):
    mmproj = write_mmproj(tmp_path / "mmproj.gguf", 576)
    with in_process([*ARGS, "--mmproj", str(mmproj)], tmp_path / "state", api_key="s3cret") as server:
        ok = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
        assert server.get("/health", headers={"Authorization": ""})[0] == 200  # no key needed there
        for auth in ("", "Bearer wrong"):
            status, body, _ = server.post("/v1/chat/completions", ok, headers={"Authorization": auth})
            assert status == 401 and body["error"]["type"] == "authentication_error"
        assert server.get("/v1/models", headers={"Authorization": ""})[0] == 401

        # a conversation to keep unchanged through the bad requests that extend it
        status, first, _ = server.post("/v1/chat/completions", {**ok, "temperature": 0})
        assert status == 200
        history = [*ok["messages"], {"role": "assistant", "content": first["choices"][0]["message"]["content"]}]
        sid = first["session_id"]
        before = server.get(f"/v1/sessions/{sid}")[1]

        cases = [
            (dict(raw=b'{"messages": [{"role": "user", '), 400, "invalid_json"),
            ({"messages": []}, 400, "invalid_value"),
            ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
            ({**ok, "temperature": -1}, 400, "invalid_value"),
            ({**ok, "top_p": 1.5}, 400, "invalid_value"),
            ({**ok, "max_tokens": 0}, 400, "invalid_value"),
            ({**ok, "best_of": 2}, 400, "unsupported"),
            ({**ok, "frequency_penalty": 2.5}, 400, "invalid_value"),
            ({**ok, "logit_bias": {"49152": 5}}, 400, "invalid_value"),
            ({**ok, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wizard"}}}}, 400,
             "invalid_schema"),
            ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, None),
            ({"messages": [*history, image_message("data:image/png;base64,!!not-base64!!")]}, 400, "invalid_image"),
            ({"messages": [*history, image_message("data:image/png;base64," + base64.b64encode(b"no image").decode())]},
             400, "invalid_image"),
            ({"messages": [*history, image_message("file:///etc/passwd")]}, 400, "invalid_image_url"),
            ({"messages": [*history, image_message("https://example.com/cat.png")]}, 400, "invalid_image_url"),
            ({"messages": [*history, image_message("/etc/hosts")]}, 400, "invalid_image_url"),
        ]
        for body, status, code in cases:
            raw = body.pop("raw", None) if isinstance(body, dict) and "raw" in body else None
            got, err, _ = server.post("/v1/chat/completions", None if raw else body, raw=raw)
            assert got == status and set(err["error"]) == ERROR_KEYS, (body, err)
            if code:
                assert err["error"]["code"] == code, err
        assert server.get(f"/v1/sessions/{sid}")[1] == before  # the conversation is as it was

        status, r, _ = server.post("/v1/chat/completions", {"messages": [*history, image_message(png_data_url())],
                                                            "max_tokens": 4, "temperature": 0})
        assert status == 200 and r["session_id"] == sid  # it continued the same conversation
        after = server.get(f"/v1/sessions/{sid}")[1]
        assert after["image_tokens_seen"] == 16 and after["tokens_seen"] > before["tokens_seen"] + 16

    with in_process(ARGS, tmp_path / "plain") as server:  # no projector: images are refused
        status, err, _ = server.post("/v1/chat/completions", {"messages": [image_message(png_data_url())]})
        assert status == 400 and err["error"]["code"] == "images_unsupported"
        assert server.post("/v1/chat/completions", {**ok, "max_tokens": 2})[0] == 200


def test_conversations_beyond_max_sessions_wait_on_disk_and_come_back(default_model, tmp_path):
    """Three conversations, two contexts: the least recently used is saved and restored exactly
    (the next token's log-probabilities to the bit, flash attention off); a restarted server
    continues every conversation."""
    chats = {name: [f"My name is {name}.", "Name a colour.", "What is my name?"] for name in ("Ada", "Bo", "Cy")}
    expected = {name: reference_replies(default_model, turns) for name, turns in chats.items()}
    state = tmp_path / "state"
    history = {name: [] for name in chats}

    def turn(client, name, i, **extra):
        history[name].append({"role": "user", "content": chats[name][i]})
        r = client.chat.completions.create(model="m", messages=history[name], max_tokens=12, temperature=0, **extra)
        history[name].append({"role": "assistant", "content": r.choices[0].message.content})
        assert r.choices[0].message.content == expected[name][i], (name, i)
        return r

    with in_process([*ARGS, "--max-sessions", "2"], state) as server:
        client = server.client()
        for name in chats:
            turn(client, name, 0)
        health = server.get("/health")[1]
        assert (health["sessions_live"], health["sessions_on_disk"], health["saves"]) == (2, 1, 1)  # Ada went to disk
        r = turn(client, "Ada", 1, logprobs=True, top_logprobs=5)  # restored (Bo goes to disk)
        health = server.get("/health")[1]
        assert health["restores"] == 1 and health["sessions_on_disk"] == 1
        assert r.usage.prompt_tokens < 20  # the restored stream held the first turn: only the new message
        status, metrics, _ = server.get("/metrics")
        assert status == 200 and "infmllm_session_restores_total 1" in metrics and "infmllm_sessions_on_disk 1" in metrics
    with StreamSession(default_model, flash_attn=False, n_threads=1, **SETTINGS) as s:  # Ada, never saved
        s.chat(chats["Ada"][0], max_tokens=12, temperature=0)
        s.user_turn(chats["Ada"][1])
        logp = s.runtime.logits().astype(np.float64)
        logp = logp - logp.max() - np.log(np.exp(logp - logp.max()).sum())
    top = r.choices[0].logprobs.content[0].top_logprobs
    np.testing.assert_allclose([t.logprob for t in top], np.sort(logp)[::-1][:5], rtol=0, atol=1e-9)

    with in_process([*ARGS, "--max-sessions", "2"], state) as server:  # a restart continues all three
        client = server.client()
        for name, i in (("Bo", 1), ("Cy", 1), ("Ada", 2), ("Bo", 2), ("Cy", 2)):
            r = turn(client, name, i)
            assert r.usage.prompt_tokens < 20, (name, i)


def test_the_memory_re_reads_an_evicted_fact_and_says_so(default_model, tmp_path):
    """A fact told in the first turn, evicted by long turns after it, is re-read before the
    question that names it: the session view gives the re-read spans (the page marks them) and
    /metrics counts them. Memory is the server's default."""
    from infmllm_gguf.data import shakespeare_path

    text = shakespeare_path().read_text(encoding="utf-8")[300_000:303_000]
    turns = ["Remember this: the secret word of the amber lantern is falcon.",
             *(text[i:i + 700] for i in range(0, 2100, 700)), "What is the secret word of the amber lantern?"]
    with in_process(["--budget", "128", "--chunk", "32", *THREADS], tmp_path / "state") as server:
        messages = []
        for t in turns:
            messages.append({"role": "user", "content": t})
            status, r, _ = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 4},
                                       headers={"X-Session-Id": "m"})
            assert status == 200
            messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        view = server.get("/v1/sessions/m")[1]
        metrics = server.get("/metrics")[1]
    memory = view["memory"]
    assert memory["ranking"] == "hidden" and memory["tokens_stored"] > 600 and memory["last_recalled"]
    assert sum(b - a for a, b in memory["last_recalled"]) <= 128 // 4  # within the reserve
    reread = "".join(text for index, text, cached in view["view"]
                     if any(a <= index < b for a, b in memory["last_recalled"]))
    assert "falcon" in reread and "amber lantern" in reread
    recalled = next(float(line.split()[1]) for line in metrics.splitlines()
                    if line.startswith("infmllm_memory_tokens_recalled_total "))
    assert recalled >= memory["tokens_recalled"] > 0


@pytest.mark.slow
def test_a_long_conversation_costs_the_same_per_turn(default_model, tmp_path):
    """Each request carries the whole history (about 1,450 tokens by the end, 9 budgets): every turn
    is answered, the cache stays in its budget, and the last turns cost what the early ones did.
    Memory off: it re-reads up to its reserve at turns that match an old one, which this chat of
    look-alike turns does more often as it grows (bounded, see the memory test above; priced by
    `bench --only memory`)."""
    with in_process([*ARGS, "--memory", "off"], tmp_path / "state") as server:
        messages, seconds, prompt_tokens, cells = [], [], [], []
        for i in range(120):
            messages.append({"role": "user", "content": f"Turn {i}: name a number."})
            t0 = time.perf_counter()
            status, r, _ = server.post("/v1/chat/completions",
                                       {"messages": messages, "max_tokens": 4, "temperature": 0})
            seconds.append(time.perf_counter() - t0)
            assert status == 200, r
            reply = r["choices"][0]["message"]["content"]
            messages.append({"role": "assistant", "content": reply})
            prompt_tokens.append(r["usage"]["prompt_tokens"])
            cells.append(r["cache"]["cells_cached"])
    early, late = statistics.median(seconds[10:30]), statistics.median(seconds[-20:])
    print(f"\n120 turns: median {early * 1000:.0f} ms per turn (turns 10-30), {late * 1000:.0f} ms (last 20); "
          f"{r['cache']['tokens_seen']} tokens streamed, cells at most {max(cells)}")
    assert max(cells) <= 160 and r["cache"]["tokens_seen"] > 8 * 160
    assert max(prompt_tokens[-20:]) <= max(prompt_tokens[10:30]) + 2  # the new message only, never the history
    assert late <= 1.5 * early
