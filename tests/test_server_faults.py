"""`infmllm-gguf serve` under load and faults: reads while replies stream and a server killed
mid-reply (a real process); bounded requests and a state directory of the previous release (the
application in the test process); the turn log and the index files."""
import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from infmllm_gguf.server.journal import IndexEntry, TurnLog, continuing
from infmllm_gguf.state import read_state
from server_process import in_process, running

ARGS = ["--budget", "160", "--chunk", "64", "--no-flash-attn", "--threads", "1"]
FIXTURE = Path(__file__).parent / "data" / "state-dir-c418518"  # written by the server of commit c418518


def stream_chat(server, messages, session_id, *, max_tokens, stop_after=None):
    """A streamed chat request over raw HTTP: (status, text received, the final event's usage)."""
    req = urllib.request.Request(server.url + "/v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json", "X-Session-Id": session_id},
                                 data=json.dumps({"messages": messages, "max_tokens": max_tokens, "stream": True,
                                                  "temperature": 0,
                                                  "stream_options": {"include_usage": True}}).encode())
    text, usage, events = "", None, 0
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                text += choice["delta"].get("content") or ""
            events += 1
            if stop_after is not None and events >= stop_after:
                break
        return r.status, text, usage


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


@pytest.mark.slow
@pytest.mark.usefixtures("default_model")
def test_reads_while_replies_stream_are_consistent(tmp_path):
    """4 clients stream 3 replies each (2 at a time) while 3 threads poll every read-only route:
    every read answered (200), every view whole, and the counters add up to what the clients were told."""
    routes = ["/health", "/metrics", "/v1/models", "/", "/v1/sessions/poll-0", "/v1/sessions/poll-1"]

    statuses: list[int] = []
    usages: list[dict] = []
    done = threading.Event()
    with running([*ARGS, "--parallel", "2"], tmp_path / "state") as server:
        for k in range(2):  # the polled conversations exist before the polling starts
            status, _, usage = stream_chat(server, [{"role": "user", "content": "Hello."}], f"poll-{k}", max_tokens=4)
            statuses.append(status)
            usages.append(usage)

        def client(k):
            messages = []
            for i in range(3):
                messages.append({"role": "user", "content": f"Client {k}, question {i}: tell me about rivers."})
                status, text, usage = stream_chat(server, messages, f"poll-{k}", max_tokens=40)
                statuses.append(status)
                usages.append(usage)
                messages.append({"role": "assistant", "content": text})

        def poller():
            while not done.is_set():
                for route in routes:
                    status, body, _ = server.get(route)
                    statuses.append(status)
                    if route.startswith("/v1/sessions") and status == 200 and body["live"] and "view" in body:
                        assert body["tokens_seen"] == body["view"][-1][0] + 1  # one request's state, whole

        clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        pollers = [threading.Thread(target=poller) for _ in range(3)]
        for t in clients + pollers:
            t.start()
        for t in clients:
            t.join(timeout=600)
        done.set()
        for t in pollers:
            t.join(timeout=60)
        text = server.get("/metrics")[1]
    print(f"\n{len(statuses)} responses: " + ", ".join(f"{s}: {statuses.count(s)}" for s in sorted(set(statuses))))
    assert all(s == 200 for s in statuses)
    assert len(usages) == 14 and all(u is not None for u in usages)
    assert 'infmllm_requests_total{route="chat"} 14' in text
    assert metric(text, "infmllm_tokens_out_total") == sum(u["completion_tokens"] for u in usages)
    assert metric(text, "infmllm_tokens_in_total") == sum(u["prompt_tokens"] for u in usages)


@pytest.mark.usefixtures("default_model")
def test_requests_are_bounded_and_a_refused_one_changes_nothing(tmp_path):
    args = [*ARGS, "--max-tokens", "1000", "--max-prompt-tokens", "300", "--max-body-mib", "0.05",
            "--request-timeout", "3"]
    with in_process(args, tmp_path / "state") as server:
        first = [{"role": "user", "content": "My cat is called Pixel."}]
        status, r, _ = server.post("/v1/chat/completions", {"messages": first, "max_tokens": 4, "temperature": 0},
                                   headers={"X-Session-Id": "bounded"})
        assert status == 200
        before = server.get("/v1/sessions/bounded")[1]

        status, err, _ = server.post("/v1/chat/completions", {"messages": first, "max_tokens": 10 ** 12})
        assert status == 400 and err["error"]["code"] == "max_tokens_too_large" and "1000" in err["error"]["message"]
        status, err, _ = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 1001})
        assert status == 400 and err["error"]["param"] == "max_tokens"
        status, err, _ = server.post("/v1/chat/completions", {"messages": first, "max_completion_tokens": 1001})
        assert status == 400 and err["error"]["param"] == "max_completion_tokens"

        status, err, _ = server.post("/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": "x" * 60_000}]})
        assert status == 413 and err["error"]["code"] == "body_too_large"

        long = " ".join(["river"] * 400)  # 400 tokens, under the body limit
        status, err, _ = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]},
                                     headers={"X-Session-Id": "bounded"})
        assert status == 400 and err["error"]["code"] == "prompt_too_long" and "300" in err["error"]["message"]
        assert server.get("/v1/sessions/bounded")[1] == before

        # a reply that runs past the time limit (1,000 tokens of counting take ~10x the 3 s here):
        # 408, the slot freed, the conversation at its last completed request
        count = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "temperature": 0}
        status, r, _ = server.post("/v1/completions", {**count, "max_tokens": 4}, headers={"X-Session-Id": "count"})
        assert status == 200
        counted = server.get("/v1/sessions/count")[1]
        t0 = time.monotonic()
        status, err, _ = server.post("/v1/completions", {**count, "max_tokens": 1000},
                                     headers={"X-Session-Id": "count"})
        assert status == 408 and err["error"]["code"] == "timeout", err
        assert 3 <= time.monotonic() - t0 < 30
        assert server.get("/v1/sessions/count")[1] == {**counted, "live": False}

        status, r, _ = server.post("/v1/completions", {**count, "max_tokens": 4}, headers={"X-Session-Id": "count"})
        assert status == 200
        after = server.get("/v1/sessions/count")[1]
        assert after["messages"] == 2
        assert after["tokens_seen"] == counted["tokens_seen"] + r["usage"]["total_tokens"] + \
            after["memory"]["tokens_recalled"] - counted["memory"]["tokens_recalled"]
        metrics = server.get("/metrics")[1]
    assert metric(metrics, "infmllm_requests_timed_out_total") == 1
    assert metric(metrics, "infmllm_requests_replayed_total") == 1  # the restore read the first request again


def state_files_are_whole(state: Path) -> None:
    for path in state.glob("*.npz"):
        read_state(path)
    for path in state.glob("*.json"):
        IndexEntry.read(path)
    for path in state.glob("*.log"):
        size = path.stat().st_size
        TurnLog(path).entries()
        assert path.stat().st_size == size, f"{path.name} held a torn line"
    assert not list(state.glob("*.tmp"))


@pytest.mark.usefixtures("default_model")
def test_a_server_killed_mid_reply_comes_back_at_the_last_completed_turn(tmp_path):
    """Two completed turns, a third streamed reply cut by kill -9: the restarted server has the
    conversation at its second turn, and the stream it continues holds both."""
    state = tmp_path / "state"
    turns = ["My cat is called Pixel.", "My dog is called Biscuit."]
    with running(ARGS, state) as server:
        messages = []
        for t in turns:
            messages.append({"role": "user", "content": t})
            status, text, _ = stream_chat(server, messages, "crash", max_tokens=8)
            messages.append({"role": "assistant", "content": text})
        view = server.get("/v1/sessions/crash")[1]
        assert view["messages"] == 4
        messages.append({"role": "user", "content": "Tell me a very long story about both of them."})
        stream_chat(server, messages, "crash", max_tokens=200, stop_after=5)
        server.proc.kill()  # SIGKILL: no shutdown, no save
        server.proc.wait(timeout=30)
    state_files_are_whole(state)
    with running(ARGS, state) as server:
        again = server.get("/v1/sessions/crash")[1]
        assert again["messages"] == 4 and again["live"] is False
        status, r, _ = server.post("/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "What are my pets called?"}],
                                    "max_tokens": 4, "temperature": 0}, headers={"X-Session-Id": "crash"})
        assert status == 200
        after = server.get("/v1/sessions/crash")[1]
        text = "".join(piece for _, piece, _ in after["view"])
        assert "Pixel" in text and "Biscuit" in text  # both completed turns are in the stream again
        assert view["view"][-1][1] in text
        assert after["messages"] == 6
    state_files_are_whole(state)


@pytest.mark.usefixtures("default_model")
def test_a_state_directory_of_the_previous_release_loads(tmp_path):
    state = tmp_path / "state"
    shutil.copytree(FIXTURE, state)
    messages = json.loads((state / "messages.json").read_text())
    (state / "messages.json").unlink()
    with in_process(ARGS, state) as server:
        view = server.get("/v1/sessions/fixture")[1]
        assert view == {"id": "fixture", "live": False, "messages": 4}
        # the whole history again, as a client that keeps it sends it: found and continued
        status, r, _ = server.post("/v1/chat/completions",
                                   {"messages": [*messages, {"role": "user", "content": "What is my cat called?"}],
                                    "max_tokens": 4, "temperature": 0})
        assert status == 200 and r["session_id"] == "fixture"
        after = server.get("/v1/sessions/fixture")[1]
        assert after["messages"] == 6 and after["tokens_seen"] > 39  # the 39 tokens of the saved stream, and more
        assert np.all([c for _, _, c in after["view"][:39]])  # the saved cells are still cached
    assert IndexEntry.read(state / "fixture.json").n_messages == 6  # rewritten in this version's schema


def test_the_turn_log_cuts_a_torn_line_and_skips_what_a_snapshot_holds(tmp_path):
    log = TurnLog(tmp_path / "c.log")
    log.append({"before": 0, "after": 2, "digest": "a"})
    log.append({"before": 2, "after": 4, "digest": "b"})
    whole = log.path.stat().st_size
    with open(log.path, "ab") as f:
        f.write(b'{"before": 4, "after": 6, "dig')  # a crash mid-append
    assert [e["after"] for e in log.entries()] == [2, 4]
    assert log.path.stat().st_size == whole  # cut off, so that the next entry starts a line
    log.append({"before": 4, "after": 6, "digest": "c"})
    assert [e["digest"] for e in continuing(log.entries(), 0)] == ["a", "b", "c"]
    assert [e["digest"] for e in continuing(log.entries(), 4)] == ["c"]  # a snapshot at 4 messages holds a, b
    assert continuing(log.entries(), 6) == []


def test_an_index_entry_of_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "c.json"
    IndexEntry("c", 4, "d").write(path)
    assert IndexEntry.read(path) == IndexEntry("c", 4, "d")
    path.write_text(json.dumps({"id": "c", "n_messages": 4, "digest": "d"}))  # schema 1: no schema field
    assert IndexEntry.read(path) == IndexEntry("c", 4, "d")
    path.write_text(json.dumps({"schema": 9, "id": "c", "n_messages": 4, "digest": "d"}))
    with pytest.raises(ValueError, match="newer infmllm-gguf"):
        IndexEntry.read(path)
