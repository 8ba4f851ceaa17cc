"""llama.cpp's RPC backend from Python: `rpc-server` processes, and a byte-counting relay.

`rpc-server` is upstream llama.cpp's tool, built by `make setup` beside the patched library: each
process lends its CPU (or GPU) to a client that puts model layers on it (`Model(rpc=[...])`,
`--rpc HOST:PORT,...` on every command). `RpcServers` starts some on this machine (tests, the
benchmark); `CountingRelay` sits between the client and a server and counts what crosses.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def server_binary() -> Path:
    """The rpc-server that `make setup` installed next to the Python interpreter (or on PATH)."""
    here = Path(sys.executable).parent / "rpc-server"
    found = here if here.exists() else shutil.which("rpc-server")
    if not found:
        raise FileNotFoundError("no rpc-server: run `make setup`, which builds it with llama.cpp's RPC backend")
    return Path(found)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, timeout: float = 20.0, process: subprocess.Popen | None = None) -> None:
    """Return once something accepts connections at host:port; RuntimeError after `timeout` or if
    `process` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"rpc-server on port {port} exited with status {process.returncode}")
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens at {host}:{port} after {timeout:.0f} s")


def server_command(host: str, port: int, threads: int | None = None, devices: str | None = None) -> list[str]:
    return [str(server_binary()), "--host", host, "--port", str(port),
            *(["--threads", str(threads)] if threads else []), *(["--device", devices] if devices else [])]


class RpcServers:
    """`n` rpc-server processes on 127.0.0.1 (free ports), for the life of a `with` block.
    `endpoints` are their HOST:PORT; with `count` each is reached through a `CountingRelay`, and
    `endpoints` name the relays."""

    def __init__(self, n: int, *, threads: int = 1, count: bool = False):
        self.processes: list[subprocess.Popen] = []
        self.relays: list[CountingRelay] = []
        self.endpoints: list[str] = []
        try:
            for _ in range(n):
                port = free_port()
                proc = subprocess.Popen(server_command("127.0.0.1", port, threads),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.processes.append(proc)
                wait_listening("127.0.0.1", port, process=proc)
                if count:
                    self.relays.append(CountingRelay("127.0.0.1", port))
                    port = self.relays[-1].port
                self.endpoints.append(f"127.0.0.1:{port}")
        except BaseException:
            self.close()
            raise

    def kill(self, i: int) -> None:
        """Kill server `i` at once (SIGKILL), as a crashed machine would vanish."""
        self.processes[i].kill()
        self.processes[i].wait()

    def close(self) -> None:
        for relay in self.relays:
            relay.close()
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> "RpcServers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CountingRelay:
    """A TCP relay on a free local port to `host:port` that counts the bytes each way:
    `sent` (client to server: weights at load, then graphs and inputs) and `received`."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.sent = self.received = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.sent, self.received

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, "sent"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, "received"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
        except OSError:
            pass
        for s in (src, dst):  # one side gone: close both, so the other side sees it at once
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass


def serve(host: str, port: int, threads: int | None = None, devices: str | None = None) -> None:
    """Become one rpc-server in the foreground (`infmllm-gguf rpc-server`): the process is replaced,
    so a signal meant for the command stops the server itself."""
    command = server_command(host, port, threads, devices)
    os.execv(command[0], command)
