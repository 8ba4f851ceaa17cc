"""`infmllm-gguf serve` as clients use it: a real server process on 127.0.0.1 (a free port), the
official `openai` client, raw HTTP for what clients get wrong, and a real browser for the page."""
import base64
import io
import json
import os
import statistics
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from infmllm_gguf import StreamSession
from infmllm_gguf.synthetic_mmproj import write_mmproj
from server_process import running

THREADS = ["--threads", "1"]  # the same sums as the in-process references below

TURNS = ["Name a colour.", "Name an animal.", "Name a fruit."]
SETTINGS = dict(budget=160, chunk=64)
ARGS = ["--budget", "160", "--chunk", "64", "--no-flash-attn", *THREADS]


def reference_replies(model, turns, *, system=None, max_tokens=12):
    """What StreamSession.chat answers in-process, greedily, for the same turns."""
    with StreamSession(model, flash_attn=False, n_threads=1, **SETTINGS) as s:
        return [s.chat(t, system=system if i == 0 else None, max_tokens=max_tokens, temperature=0)
                for i, t in enumerate(turns)]


def converse(client, turns, *, system=None, max_tokens=12, **extra):
    messages = [{"role": "system", "content": system}] if system else []
    replies = []
    for t in turns:
        messages.append({"role": "user", "content": t})
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0, **extra)
        replies.append(r)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    return replies


@pytest.mark.usefixtures("default_model")
def test_the_openai_client_gets_what_a_session_answers(default_model, tmp_path):
    expected = reference_replies(default_model, TURNS, system="Answer in one word.")
    with running(ARGS, tmp_path / "state") as server:
        client = server.client()
        replies = converse(client, TURNS, system="Answer in one word.")
        assert [r.choices[0].message.content for r in replies] == expected
        ids = {r.model_extra["session_id"] for r in replies}
        assert len(ids) == 1  # one conversation, found again from the history each request repeats
        # each turn reads only its new messages: the second's prompt is far shorter than the first's
        assert replies[1].usage.prompt_tokens < replies[0].usage.prompt_tokens
        assert all(r.model_extra["cache"]["cells_cached"] <= 160 for r in replies)

        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": TURNS[0]}],
                                                max_tokens=12, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reference_replies(default_model, TURNS[:1])[0]
        assert chunks[-1].usage.completion_tokens > 0 and chunks[-2].choices[0].finish_reason in ("stop", "length")

        done = client.completions.create(model="m", prompt="The capital of France is", max_tokens=6, temperature=0)
        with StreamSession(default_model, flash_attn=False, n_threads=1, **SETTINGS) as s:
            assert done.choices[0].text == "".join(s.generate("The capital of France is", max_tokens=6,
                                                              temperature=0))
        assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct.Q4_1"]
        first = converse(client, TURNS[:1], logprobs=True, top_logprobs=3)[0].choices[0].logprobs.content[0]
        assert len(first.top_logprobs) == 3 and first.top_logprobs[0].logprob >= first.top_logprobs[1].logprob
        assert first.logprob == first.top_logprobs[0].logprob  # greedy: the most likely token
        whole = converse(client, TURNS[:1], logprobs=True, top_logprobs=2)[0].choices[0].logprobs.content
        streamed = [e for c in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": TURNS[0]}], max_tokens=12, temperature=0, stream=True,
            logprobs=True, top_logprobs=2) if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole] and whole


@pytest.mark.usefixtures("default_model")
def test_a_200_turn_conversation_costs_the_same_per_turn(tmp_path):
    """Each request carries the whole history (about 2,400 tokens by the end, 15 budgets): every turn
    is answered, the cache stays in its budget, and the last turns cost what the early ones did.
    Memory off: it re-reads up to its reserve at turns that match an old one, which this chat of
    look-alike turns does more often as it grows (bounded, see the memory test below; priced by
    `bench --only memory`)."""
    with running([*ARGS, "--memory", "off"], tmp_path / "state") as server:
        messages, seconds, prompt_tokens, cells = [], [], [], []
        for i in range(200):
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
        health = server.get("/health")[1]
    early, late = statistics.median(seconds[10:30]), statistics.median(seconds[-20:])
    print(f"\n200 turns: median {early * 1000:.0f} ms per turn (turns 10-30), {late * 1000:.0f} ms (last 20); "
          f"{r['cache']['tokens_seen']} tokens streamed, cells at most {max(cells)}; server RSS {health['rss_mib']:.0f} "
          f"MiB (bound {health['rss_bound_mib']:.0f})")
    assert max(cells) <= 160 and r["cache"]["tokens_seen"] > 15 * 160
    assert max(prompt_tokens[-20:]) <= max(prompt_tokens[10:30]) + 2  # the new message only, never the history
    assert late <= 1.5 * early


@pytest.mark.usefixtures("default_model")
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

    with running([*ARGS, "--max-sessions", "2"], state) as server:
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

    with running([*ARGS, "--max-sessions", "2"], state) as server:  # a restart continues all three
        client = server.client()
        for name, i in (("Bo", 1), ("Cy", 1), ("Ada", 2), ("Bo", 2), ("Cy", 2)):
            r = turn(client, name, i)
            assert r.usage.prompt_tokens < 20, (name, i)


@pytest.mark.usefixtures("default_model")
def test_eight_clients_at_once(default_model, tmp_path):
    """8 threads x 10 turns on their own conversations, 2 served at a time, 4 queued, 4 contexts:
    every request answered or refused with 503 (and retried), each conversation answered as if it
    were alone (greedy replies equal a session's, one client at a time), memory within the bound
    the server states."""
    def system(k):
        return f"You are assistant number {k}."

    def question(k, i):
        return f"Client {k}, turn {i}: count to three."

    expected = {k: reference_replies(default_model, [question(k, i) for i in range(10)], system=system(k), max_tokens=3)
                for k in range(8)}
    results: dict[int, list] = {}
    refused = []
    with running([*ARGS, "--max-sessions", "4", "--parallel", "2", "--queue", "4"], tmp_path / "state") as server:
        def client_thread(k):
            messages = [{"role": "system", "content": system(k)}]
            out = []
            for i in range(10):
                messages.append({"role": "user", "content": question(k, i)})
                while True:
                    status, r, headers = server.post("/v1/chat/completions",
                                                     {"messages": messages, "max_tokens": 3, "temperature": 0})
                    if status != 503:
                        break
                    refused.append(k)
                    assert r["error"]["code"] == "busy" and headers.get("retry-after") == "1"
                    time.sleep(float(headers["retry-after"]) / 4)
                assert status == 200, r
                messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
                out.append(r)
            results[k] = out

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        elapsed = time.perf_counter() - t0
        health = server.get("/health")[1]
    print(f"\n8 clients x 10 turns in {elapsed:.0f} s; {len(refused)} refusals (503, retried); "
          f"{health['saves']} saves, {health['restores']} restores; RSS {health['rss_mib']:.0f} MiB, "
          f"bound {health['rss_bound_mib']:.0f}")
    assert sorted(results) == list(range(8)) and all(len(r) == 10 for r in results.values())
    ids = [{r["session_id"] for r in out} for out in results.values()]
    assert all(len(i) == 1 for i in ids) and len(set.union(*ids)) == 8
    for k, out in results.items():
        assert [r["choices"][0]["message"]["content"] for r in out] == expected[k], k
    assert health["saves"] > 0 and health["restores"] > 0
    assert health["rss_mib"] <= health["rss_bound_mib"]


def png_data_url(seed=0) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url, text="What is this?"):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


@pytest.mark.usefixtures("default_model")
def test_bad_requests_are_refused_and_the_server_goes_on(tmp_path):
    mmproj = write_mmproj(tmp_path / "mmproj.gguf", 576)
    with running([*ARGS, "--mmproj", str(mmproj)], tmp_path / "state", api_key="s3cret") as server:
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
            ({"messages": []}, 422, None),
            ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, None),
            ({**ok, "temperature": -1}, 422, None),
            ({**ok, "top_p": 1.5}, 422, None),
            ({**ok, "max_tokens": 0}, 422, None),
            ({**ok, "frequency_penalty": 0.5}, 400, "unsupported"),
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
            assert got == status and set(err["error"]) == {"message", "type", "param", "code"}, (body, err)
            if code:
                assert err["error"]["code"] == code, err
        assert server.get(f"/v1/sessions/{sid}")[1] == before  # the conversation is as it was

        status, r, _ = server.post("/v1/chat/completions", {"messages": [*history, image_message(png_data_url())],
                                                            "max_tokens": 4, "temperature": 0})
        assert status == 200 and r["session_id"] == sid  # it continued the same conversation
        after = server.get(f"/v1/sessions/{sid}")[1]
        assert after["image_tokens_seen"] == 16 and after["tokens_seen"] > before["tokens_seen"] + 16

    with running(ARGS, tmp_path / "plain") as server:  # no projector: images are refused
        status, err, _ = server.post("/v1/chat/completions", {"messages": [image_message(png_data_url())]})
        assert status == 400 and err["error"]["code"] == "images_unsupported"
        assert server.post("/v1/chat/completions", {**ok, "max_tokens": 2})[0] == 200


@pytest.mark.usefixtures("default_model")
def test_a_client_that_leaves_mid_stream_leaves_the_conversation_whole(tmp_path):
    with running(ARGS, tmp_path / "state") as server:
        req = urllib.request.Request(server.url + "/v1/chat/completions", method="POST",
                                     headers={"Content-Type": "application/json", "X-Session-Id": "leaver"},
                                     data=json.dumps({"messages": [{"role": "user", "content": "Tell a long story."}],
                                                      "max_tokens": 120, "stream": True}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            for _ in range(4):
                r.readline()
        time.sleep(3)
        view = server.get("/v1/sessions/leaver")[1]
        assert view["messages"] == 2 and view["tokens_seen"] <= 14 + 120  # the user turn and its reply so far
        status, r2, _ = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Go on."}],
                                                              "max_tokens": 4}, headers={"X-Session-Id": "leaver"})
        recalled = server.get("/v1/sessions/leaver")[1]["memory"]["tokens_recalled"] - view["memory"]["tokens_recalled"]
        assert status == 200 and r2["cache"]["tokens_seen"] == view["tokens_seen"] + r2["usage"]["total_tokens"] + recalled


@pytest.mark.usefixtures("default_model")
def test_the_memory_re_reads_an_evicted_fact_and_says_so(tmp_path):
    """A fact told in the first turn, evicted by long turns after it, is re-read before the
    question that names it: the session view gives the re-read spans (the page marks them) and
    /metrics counts them. Memory is the server's default."""
    from infmllm_gguf.data import shakespeare_path

    text = shakespeare_path().read_text(encoding="utf-8")[300_000:303_000]
    turns = ["Remember this: the secret word of the amber lantern is falcon.",
             *(text[i:i + 700] for i in range(0, 2100, 700)), "What is the secret word of the amber lantern?"]
    with running(["--budget", "128", "--chunk", "32", *THREADS], tmp_path / "state") as server:
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


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        pytest.skip("no Debian chromium and chromium-driver here: `make setup` installs them where apt-get can")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


@pytest.mark.usefixtures("default_model")
def test_the_web_page_streams_a_reply_and_shows_the_cache(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running(["--budget", "96", "--chunk", "32", *THREADS], tmp_path / "state") as server:
        driver = browser()
        try:
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 120)
            for text in ("Tell me about the sea.", "And about the mountains?", "Which do you prefer?"):
                box = driver.find_element(By.ID, "message")
                box.send_keys(text)
                driver.find_element(By.ID, "send").click()
                wait.until(lambda d: d.find_element(By.ID, "send").is_enabled()
                           and d.find_elements(By.CSS_SELECTOR, ".assistant")
                           and d.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text.strip())
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#stream span.gone"))
            occupancy = driver.find_element(By.ID, "occupancy").text
            replies = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".assistant")]
            kept = driver.find_elements(By.CSS_SELECTOR, "#stream span.kept")
            gone = driver.find_elements(By.CSS_SELECTOR, "#stream span.gone")
            driver.save_screenshot(os.environ.get("INFMLLM_SCREENSHOT", str(tmp_path / "server.png")))
        finally:
            driver.quit()
    assert len(replies) == 3 and all(r.strip() and not r.startswith("error") for r in replies)
    cells, budget = map(int, occupancy.removeprefix("cells ").split(" / "))
    assert 0 < cells <= budget == 96
    assert kept and gone  # the cache evicted part of the conversation and the view shows which
