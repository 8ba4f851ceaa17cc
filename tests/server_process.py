"""A real `infmllm-gguf serve` process on 127.0.0.1 (a free port), for the server's tests."""
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
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

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # a graceful stop saves every live conversation
        assert self.proc.wait(timeout=120) == 0, self.output()
        assert "Traceback" not in self.output(), self.output()


@contextmanager
def running(args, state_dir, api_key=None):
    server = Server(args, state_dir, api_key)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()
