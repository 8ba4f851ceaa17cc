"""`infmllm-gguf rpc-server`: lend this machine's CPU (or GPU) to another machine's `--rpc`."""
from __future__ import annotations

from typing import Optional

import typer

from .common import app, fail


@app.command("rpc-server")
def rpc_server(
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; the protocol has no authentication: "
                                                         "bind to a trusted network only"),
    port: int = typer.Option(50052, "--port", min=1, max=65535),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: half the cores)"),
    device: Optional[str] = typer.Option(None, "--device", help="llama.cpp devices to lend, comma-separated "
                                                                "(default: all of this machine's)"),
) -> None:
    """Run llama.cpp's rpc-server (built by `make setup`) in the foreground: a client started with
    --rpc HOST:PORT puts model layers, their KV cache and their share of every decode here."""
    from infmllm_gguf.rpc import serve, server_binary

    try:
        server_binary()
    except FileNotFoundError as exc:
        fail(str(exc))
    typer.echo(f"rpc-server on {host}:{port}; clients: --rpc {host}:{port}", err=True)
    serve(host, port, threads, device)
