"""`infmllm-gguf serve` for the server's tests: a real process on 127.0.0.1 (a free port, `running`),
or the same command's application in the test process over FastAPI's TestClient (`in_process`: no
process, no port, the model loaded in a second), both answering the same calls."""
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from unittest import mock

THREADS = ["--threads", "1"]  # the same sums as the in-process references (`reference_replies`)
SETTINGS = dict(budget=160, chunk=64)
ARGS = ["--budget", "160", "--chunk", "64", "--no-flash-attn", *THREADS]


def reference_replies(model, turns, *, system=None, max_tokens=12):
    """What StreamSession.chat answers in-process, greedily, for the same turns."""
    from infmllm_gguf import StreamSession

    with StreamSession(model, flash_attn=False, n_threads=1, **SETTINGS) as s:
        return [s.chat(t, system=system if i == 0 else None, max_tokens=max_tokens, temperature=0)
                for i, t in enumerate(turns)]


def converse(client, turns, *, system=None, max_tokens=12, **extra):
    """A conversation through the openai client, its whole history sent with each turn."""
    messages = [{"role": "system", "content": system}] if system else []
    replies = []
    for t in turns:
        messages.append({"role": "user", "content": t})
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0, **extra)
        replies.append(r)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    return replies


def events(text: str) -> list:
    """The events of a server-sent event stream, [DONE] last."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """What the tests call on a server: `request(method, path, body, headers, raw)` -> (status, body, headers);
    `with` one, it is stopped at the end (unless a test stopped it)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        raise NotImplementedError

    def request(self, method, path, body=None, headers=None, raw: bytes | None = None):
        raise NotImplementedError

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)


class Server(Endpoint):
    """A real `infmllm-gguf serve` process."""

    def __init__(self, args, state_dir, api_key=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "infmllm_gguf.cli.main", "serve", "--port", str(self.port), "--state-dir", str(state_dir),
               *args, *(["--api-key", api_key] if api_key else [])]
        self.log = open(state_dir.parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.output()}")
            try:
                self.get("/health")
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the server did not answer: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def request(self, method, path, body=None, headers=None, raw: bytes | None = None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
             **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            r = urllib.request.urlopen(req, timeout=300)
        except urllib.error.HTTPError as e:
            r = e
        with r:
            data, headers = r.read(), {k.lower(): v for k, v in r.headers.items()}
        body = json.loads(data) if headers.get("content-type", "").startswith("application/json") else data.decode()
        return r.status if hasattr(r, "status") else r.code, body, headers

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # a graceful stop saves every live conversation
        assert self.proc.wait(timeout=120) == 0, self.output()
        assert "Traceback" not in self.output(), self.output()


    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop()


running = Server  # `with running(ARGS, state_dir) as server:`


class InProcess(Endpoint):
    """The application `infmllm-gguf serve ARGS` makes, its flags read by the command itself, served
    in this process through a TestClient: `get`, `post`, `client` and `stop` as `Server` has them
    (a streamed reply comes whole, when it ends)."""

    def __init__(self, args, state_dir, api_key=None):
        from starlette.testclient import TestClient
        from typer.testing import CliRunner

        from infmllm_gguf.cli.main import app as cli

        made = {}
        argv = ["serve", "--state-dir", str(state_dir), *map(str, args), *(["--api-key", api_key] if api_key else [])]
        with mock.patch("uvicorn.run", lambda app, **_: made.update(app=app)), mock.patch("signal.signal"):
            result = CliRunner().invoke(cli, argv, catch_exceptions=False)
        assert result.exit_code == 0 and "app" in made, result.output
        self.api_key, self.url = api_key, "http://testserver"
        self.http = TestClient(made["app"], base_url=self.url)
        self.http.__enter__()  # the lifespan: the snapshot thread starts

    def request(self, method, path, body=None, headers=None, raw: bytes | None = None):
        h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
             **(headers or {})}
        r = self.http.request(method, path, content=raw if raw is not None else
                              (None if body is None else json.dumps(body).encode()), headers=h)
        headers = {k.lower(): v for k, v in r.headers.items()}
        body = r.json() if headers.get("content-type", "").startswith("application/json") else r.text
        return r.status_code, body, headers

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, http_client=self.http)

    def stop(self) -> None:
        """As SIGTERM stops a server: the requests in flight finish, every live conversation is saved."""
        self.http.__exit__(None, None, None)


in_process = InProcess  # `with in_process(ARGS, state_dir) as server:`
