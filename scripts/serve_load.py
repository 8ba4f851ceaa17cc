"""A load benchmark of `infmllm-gguf serve`: K clients talking to one real server for M minutes.

    python scripts/serve_load.py [MODEL] --clients 1,4,16 --minutes 3 [--json OUT.json] [-- extra serve args...]
    e.g.  python scripts/serve_load.py --clients 1,4,16 --minutes 3 --json load.json -- --budget 256 --memory off

For each K in --clients a fresh server process starts (`python -m infmllm_gguf.cli.main serve` on a free port, a
temporary --state-dir, --threads N, then the extra args, which win over --threads), and K client
threads, each with the official `openai` client (max_retries=0: every retry here is counted), loop
over conversations until the time is up:
  - short conversations (1-3 user turns) and long ones (10-30), the whole history resent each turn;
  - about half the requests streamed (with usage in the last chunk), half not;
  - about 1 streamed request in 10 disconnects after a few chunks; the conversation then goes on
    with what was received as the assistant's message, or a new one begins;
  - max_tokens 8-64, temperature 0.7, user messages of a few sentences, now and then 300-800 words.
A 503 (the server is busy) is counted and retried after the Retry-After it gives (jittered).

Per K it reports: requests attempted (each 503 retry is one more), served (200; a disconnected
stream counts as served), 503s, errors (5xx other than 503, errors inside a stream, connection
errors: all should be 0), other 4xx, disconnects made; time to the first content chunk of streamed
requests and the latency of non-streamed ones (p50/p99, each over the attempts that were served);
completion tokens per second of wall time (usage's completion_tokens; the chunks received for a
disconnected stream); the server's RSS from /health at the start and end, sampled every ~5 s
(maximum, and the slope of a line fitted through the samples, MiB/minute: flat is 0; the first
minute includes the warm-up, conversations becoming live up to --max-sessions, so judge it over
runs of a few minutes). Then the server is stopped with SIGTERM and must exit 0 with no traceback
in its log; --log-dir keeps each server's whole log.

The exit status is 1 when any K had an error, a server that did not start or did not stop cleanly;
130 on Ctrl-C (or SIGTERM), after stopping the clients and the server.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openai
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
RSS_EVERY_S = 5.0
REQUEST_TIMEOUT_S = 600.0  # a request may wait behind the whole queue on a slow CPU
LOG_TAIL_CHARS = 20_000  # of each server's log, in --json
STDERR_TAIL_CHARS = 3_000  # shown when a level went wrong

SENTENCES = [
    "The river bends twice before it reaches the old mill at the edge of town.",
    "Every Tuesday the baker sets aside a loaf of rye for the lighthouse keeper.",
    "A cold front is expected to move in from the north by late afternoon.",
    "The library keeps its oldest maps in a drawer that sticks in damp weather.",
    "She counted forty-two steps from the station platform to the ticket office.",
    "Copper turns green when it is left outside in the rain for many years.",
    "The committee postponed the vote until the budget figures were checked again.",
    "Owls can turn their heads much further than most other birds.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "A small boat was tied to the pier with a rope that had seen better days.",
    "The train to the coast leaves at seven and stops at every village on the way.",
    "Most of the orchard was planted by the farmer's grandfather after the war.",
    "The museum's new wing opens to the public at the beginning of next month.",
    "Glaciers carve wide valleys as they move slowly down from the mountains.",
    "The clock in the square has been running five minutes fast since spring.",
    "He keeps his notes in a green notebook with a broken elastic band.",
    "Bees return to the same flowers as long as the nectar keeps flowing.",
    "The bridge was painted red so that ships could see it through the fog.",
    "Nobody remembers who first planted the chestnut tree behind the school.",
    "The market sells fish in the morning and flowers in the afternoon.",
]
QUESTIONS = [
    "What do you make of that?", "Summarise this in one sentence.", "What happens next?",
    "Can you explain that more simply?", "Name one thing that stands out.", "Why might that be?",
    "Continue the story.", "What is the main point here?",
]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "You are a patient teacher."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None  # loaded here: the child after fork only calls it
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when this script dies, even by SIGKILL."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Server:
    """One `serve` process on 127.0.0.1, ready once /health answers (as tests/test_server.py's)."""

    def __init__(self, model: Path | None, threads: int, extra: list[str], state_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "infmllm_gguf.cli.main", "serve", *([str(model)] if model else []), "--port", str(self.port),
               "--state-dir", str(state_dir / "sessions"), "--threads", str(threads), *extra]
        self.log = open(state_dir / "server.log", "w+")
        # a session of its own: Ctrl-C reaches this script only, which stops the server after its clients
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent if LIBC else None)
        try:
            self.wait_ready(timeout=120)
        except BaseException:  # Ctrl-C while loading included
            self.stop(timeout=10)
            raise

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the server did not answer in {timeout:.0f} s:\n{self.output()}")

    def health(self) -> dict:
        return get_json(self.url + "/health")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM (a graceful stop, saving the conversations): the exit status, or None when it
        was not over in `timeout` and had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.proc.poll() is None:  # hung, or a second Ctrl-C: it must not outlive this script
                self.proc.kill()
                self.proc.wait()


def stop_checked(server: Server, timeout: float = 120) -> int:
    """Stop `server` and close its log: 0 when it exited 0 with no traceback in its log; else its
    exit status (1 for a traceback or a kill), the end of its log printed to stderr."""
    try:
        exit_code = server.stop(timeout)
        log = server.output()
    finally:
        server.log.close()
    if exit_code != 0 or "Traceback" in log:
        print(f"the server exited {'killed' if exit_code is None else exit_code}; the end of its log:\n"
              f"{log[-STDERR_TAIL_CHARS:]}", file=sys.stderr)
        return exit_code or 1
    return 0


def split_serve_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """A script's own arguments and the extra ones for `serve`, which follow `--` untouched."""
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def print_rows(head: list[str], rows: list[list[str]]) -> None:
    """A table: the header, then the rows, each column right-aligned to its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for line in [head, *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


@dataclass
class Tally:
    """What one client saw; each thread writes its own, the main thread only reads and sums them."""
    attempted: int = 0
    served: int = 0
    busy: int = 0
    errors: int = 0
    client_errors: int = 0
    disconnects: int = 0
    completion_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the first few errors' and 4xx's messages

    def failed(self, message: str, *, error: bool) -> None:
        if error:
            self.errors += 1
        else:
            self.client_errors += 1
        if len(self.failures) < 5:
            self.failures.append(message[:300])

    def add(self, other: Tally) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


def user_message(rng: random.Random) -> str:
    if rng.random() < 0.05:  # a long message: a pasted document
        words: list[str] = []
        target = rng.randint(300, 800)
        while len(words) < target:
            words += rng.choice(SENTENCES).split()
        return " ".join(words[:target]) + "\n\n" + rng.choice(QUESTIONS)
    return " ".join(rng.choices(SENTENCES, k=rng.randint(1, 3))) + " " + rng.choice(QUESTIONS)


class Client:
    """One client thread's loop over conversations, until `stop` is set."""

    def __init__(self, url: str, seed: int, stop: threading.Event, abort: threading.Event):
        self.api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        self.rng = random.Random(seed)
        self.stop, self.abort = stop, abort
        self.tally = Tally()

    def run(self) -> None:
        while not self.stop.is_set():
            self.conversation()

    def conversation(self) -> None:
        rng = self.rng
        n_turns = rng.randint(1, 3) if rng.random() < 0.7 else rng.randint(10, 30)
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
        for _ in range(n_turns):
            if self.stop.is_set():
                return
            messages.append({"role": "user", "content": user_message(rng)})
            result = self.request(messages)
            if result is None:  # a failure: begin again rather than resend a history the server may not have
                return
            reply, disconnected = result
            messages.append({"role": "assistant", "content": reply})
            if disconnected and rng.random() < 0.5:
                return

    def request(self, messages: list[dict]) -> tuple[str, bool] | None:
        """The reply and whether this client cut it short; None on an error. 503s are retried."""
        rng = self.rng
        stream = rng.random() < 0.5
        # disconnect after this many content chunks (0: read to the end)
        cut_after = rng.randint(1, 4) if stream and rng.random() < 0.1 else 0
        params = dict(model="default", messages=messages, max_tokens=rng.randint(8, 64), temperature=0.7)
        while True:
            self.tally.attempted += 1
            try:
                if stream:
                    return self.streamed(params, cut_after)
                return self.plain(params)
            except openai.APIStatusError as exc:
                if exc.status_code == 503:
                    self.tally.busy += 1
                    if self.stop.is_set():  # the time is up: no more retries
                        return None
                    time.sleep(float(exc.response.headers.get("retry-after", 1)) * rng.uniform(0.5, 1.0))
                    continue
                self.tally.failed(f"{exc.status_code}: {exc.message}", error=exc.status_code >= 500)
                return None
            except openai.APIError as exc:  # a connection error, or an error event inside a stream
                self.tally.failed(f"{type(exc).__name__}: {exc}", error=True)
                return None

    def plain(self, params: dict) -> tuple[str, bool]:
        sent = time.perf_counter()
        r = self.api.chat.completions.create(**params)
        self.tally.latency_s.append(time.perf_counter() - sent)
        self.tally.served += 1
        self.tally.completion_tokens += r.usage.completion_tokens if r.usage else 0
        return r.choices[0].message.content or "", False

    def streamed(self, params: dict, cut_after: int) -> tuple[str, bool]:
        sent = time.perf_counter()
        stream = self.api.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
        self.tally.served += 1  # the 200 came: errors from here on arrive as events in the stream
        parts: list[str] = []
        usage_tokens = None
        with stream:
            for chunk in stream:
                if chunk.usage is not None:
                    usage_tokens = chunk.usage.completion_tokens
                text = chunk.choices[0].delta.content if chunk.choices else None
                if not text:
                    continue
                if not parts:
                    self.tally.ttft_s.append(time.perf_counter() - sent)
                parts.append(text)
                if len(parts) == cut_after or self.abort.is_set():
                    break  # leaving the `with` closes the connection: the server sees the client go
            else:
                self.tally.completion_tokens += usage_tokens if usage_tokens is not None else len(parts)
                return "".join(parts), False
        self.tally.disconnects += 1
        self.tally.completion_tokens += len(parts)
        return "".join(parts), True


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_level(k: int, minutes: float, model: Path | None, threads: int, extra: list[str], seed: int,
              log_dir: Path | None) -> dict:
    """Start a server, run `k` clients against it for `minutes`, stop it: the level's figures."""
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        server = Server(model, threads, extra, Path(tmp))
        stop, abort = threading.Event(), threading.Event()
        clients = [Client(server.url, seed * 1000 + i, stop, abort) for i in range(k)]
        threads_ = [threading.Thread(target=c.run, name=f"client-{i}", daemon=True) for i, c in enumerate(clients)]
        rss: list[tuple[float, float]] = []  # (seconds since start, MiB)
        try:
            rss_start = server.health()["rss_mib"]
            started = time.monotonic()
            for t in threads_:
                t.start()
            sampled = -math.inf
            total = minutes * 60
            with tqdm(total=round(total), desc=f"K={k}", leave=False,
                      bar_format="{desc}: {bar:20} {n}/{total} s{postfix}") as bar:
                while any(t.is_alive() for t in threads_):
                    now = time.monotonic() - started
                    if now >= total:
                        stop.set()  # each client finishes the request it is in
                    if now - sampled >= RSS_EVERY_S:
                        sampled = now
                        try:
                            value = server.health()["rss_mib"]
                            if value is not None:
                                rss.append((now, value))
                        except OSError:  # a busy server may answer late: a missing sample is no finding
                            pass
                    tally = Tally()
                    for c in clients:
                        tally.add(c.tally)
                    bar.n = min(round(now), bar.total)
                    bar.set_postfix_str(f"served {tally.served} 503 {tally.busy} err {tally.errors} "
                                        f"{tally.completion_tokens / max(now, 1e-9):.1f} tok/s "
                                        f"rss {fmt(rss[-1][1] if rss else rss_start, '.0f')} MiB",
                                        refresh=True)
                    time.sleep(0.5)
            wall = time.monotonic() - started
            health = server.health()
            rss_end = health["rss_mib"]
        except BaseException:
            stop.set()
            abort.set()  # streams close at their next chunk
            for t in threads_:
                t.join(timeout=10)
            raise
        finally:
            exit_code = server.stop(timeout=120 if stop.is_set() and not abort.is_set() else 30)
            log = server.output()
            server.log.close()
            if log_dir:
                (log_dir / f"server-K{k}.log").write_text(log)

    tally = Tally()
    for c in clients:
        tally.add(c.tally)
    rss_mib = [v for _, v in rss]
    slope = float(np.polyfit([t / 60 for t, _ in rss], rss_mib, 1)[0]) if len(rss) >= 2 else None
    return {
        "clients": k, "minutes": minutes, "wall_s": wall,
        "attempted": tally.attempted, "served": tally.served, "busy_503": tally.busy, "errors": tally.errors,
        "client_errors_4xx": tally.client_errors, "disconnects": tally.disconnects,
        "completion_tokens": tally.completion_tokens, "tokens_per_s": tally.completion_tokens / wall,
        "ttft_s": {"n": len(tally.ttft_s), "p50": percentile(tally.ttft_s, 50), "p99": percentile(tally.ttft_s, 99)},
        "latency_s": {"n": len(tally.latency_s), "p50": percentile(tally.latency_s, 50),
                      "p99": percentile(tally.latency_s, 99)},
        # what durability cost: each logged request's fsync'd append; each snapshot (off the request path)
        "durability": {"requests_logged": health["logged"], "log_ms_per_request": 1000 * health["log_s"] /
                       max(health["logged"], 1), "snapshots": health["saves"],
                       "ms_per_snapshot": 1000 * health["snapshot_s"] / max(health["saves"], 1)},
        "rss_mib": {"start": rss_start, "end": rss_end,
                    "max": max((v for v in [*rss_mib, rss_start, rss_end] if v is not None), default=None),
                    "slope_per_minute": slope, "samples": rss},
        "failures": tally.failures[:20],
        "server_exit_code": exit_code, "server_traceback": "Traceback" in log, "server_log_tail": log[-LOG_TAIL_CHARS:],
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(levels: list[dict]) -> None:
    head = ["K", "attempted", "served", "503", "errors", "4xx", "disconn", "ttft p50", "ttft p99", "lat p50",
            "lat p99", "tok/s", "rss start", "rss end", "rss max", "MiB/min", "log ms", "snap ms", "exit"]
    rows = [[str(r["clients"]), str(r["attempted"]), str(r["served"]), str(r["busy_503"]), str(r["errors"]),
             str(r["client_errors_4xx"]), str(r["disconnects"]), fmt(r["ttft_s"]["p50"], ".2f"),
             fmt(r["ttft_s"]["p99"], ".2f"), fmt(r["latency_s"]["p50"], ".2f"), fmt(r["latency_s"]["p99"], ".2f"),
             f"{r['tokens_per_s']:.1f}", fmt(r["rss_mib"]["start"], ".0f"), fmt(r["rss_mib"]["end"], ".0f"),
             fmt(r["rss_mib"]["max"], ".0f"), fmt(r["rss_mib"]["slope_per_minute"], "+.1f"),
             f"{r['durability']['log_ms_per_request']:.2f}", f"{r['durability']['ms_per_snapshot']:.0f}",
             "killed" if r["server_exit_code"] is None else str(r["server_exit_code"])] for r in levels]
    print_rows(head, rows)
    print("times in seconds (ttft: streamed requests, lat: non-streamed); RSS in MiB from /health; log ms: the "
          "fsync'd turn-log append per request; snap ms: one snapshot, written between requests")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, extra = split_serve_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [MODEL] [options] [-- extra serve args...]")
    p.add_argument("model", nargs="?", type=Path, help="GGUF file (default: the serve command's default model)")
    p.add_argument("--clients", default="1,4,16", help="comma-separated numbers of clients, one server each")
    p.add_argument("--minutes", type=float, default=3.0, help="how long the clients run at each level")
    p.add_argument("--threads", type=int, default=1, help="serve's --threads (an extra --threads wins)")
    p.add_argument("--seed", type=int, default=0, help="the clients' choices (client i: seed*1000+i)")
    p.add_argument("--json", type=Path, help="write every figure here, with the RSS samples and the servers' log ends")
    p.add_argument("--log-dir", type=Path, help="keep each server's whole log here (server-K<k>.log)")
    args = p.parse_args(ours)
    try:
        args.clients = [int(k) for k in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients takes numbers like 1,4,16, not {args.clients!r}")
    if any(k < 1 for k in args.clients) or args.minutes <= 0:
        p.error("--clients must be positive and --minutes more than 0")
    return args, extra


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a `kill` stops the server as Ctrl-C does
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    levels: list[dict] = []
    interrupted, started_all = False, True
    try:
        for k in args.clients:
            levels.append(run_level(k, args.minutes, args.model, args.threads, extra, args.seed, args.log_dir))
            r = levels[-1]
            if r["errors"] or r["server_exit_code"] != 0 or r["server_traceback"]:
                print(f"K={k}: errors {r['errors']}, server exit {r['server_exit_code']}; first failures: "
                      f"{r['failures']}\nthe end of the server's log:\n{r['server_log_tail'][-STDERR_TAIL_CHARS:]}",
                      file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the server is stopped; figures for the finished levels only", file=sys.stderr)
    except RuntimeError as exc:  # a server that did not start: what it printed says why
        print(exc, file=sys.stderr)
        started_all = False
    if levels:
        print_table(levels)
    if args.json:
        args.json.write_text(json.dumps({"argv": argv, "serve_args": extra, "levels": levels}, indent=1))
    if interrupted:
        return 130
    return int(not started_all or any(r["errors"] or r["server_exit_code"] != 0 or r["server_traceback"]
                                      for r in levels))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
