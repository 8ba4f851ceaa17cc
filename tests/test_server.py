"""`infmllm-gguf serve` as clients use it, end to end: a real server process on 127.0.0.1 (a free
port), the official `openai` client over HTTP, many clients at once, a client that leaves mid-stream,
and a real browser for the page. The shapes of the replies, the errors and the conversations on
disk are tested in the test process, faster: test_server_app.py."""
import json
import os
import threading
import time
import urllib.request

import pytest

from infmllm_gguf import StreamSession
from server_process import ARGS, SETTINGS, THREADS, converse, reference_replies, running

TURNS = ["Name a colour.", "Name an animal.", "Name a fruit."]


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


@pytest.mark.slow
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


@pytest.mark.slow
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
