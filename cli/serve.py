"""`infmllm-gguf serve`: an OpenAI-compatible server whose conversations never run out of context."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer

from infmllm_gguf.server.limits import Limits

from .common import (MODEL_ARG, NGL_OPT, POLICY_NAMES, app, fail, with_backend_options, with_memory_options,
                     with_policy_options)


@app.command()
@with_policy_options(sweep=False)
@with_backend_options
@with_memory_options(default="hidden")
def serve(
    model: Optional[Path] = MODEL_ARG,
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (127.0.0.1: this machine only)"),
    port: int = typer.Option(8080, "--port", min=0, max=65535),
    policy: str = typer.Option("inf-mllm", "--policy", help=POLICY_NAMES),
    chunk: int = typer.Option(256, "--chunk", min=1, help="tokens per decode"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="vision projector GGUF: image_url parts in messages"),
    max_sessions: int = typer.Option(4, "--max-sessions", min=1,
                                     help="conversations holding a llama.cpp context at once; the least recently "
                                          "used others wait on disk"),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir",
                                             help="where conversations are saved (default: <cache>/sessions); a "
                                                  "restarted server continues them"),
    parallel: int = typer.Option(1, "--parallel", min=1, help="requests served at once (1 suits a CPU)"),
    queue: int = typer.Option(16, "--queue", min=0, help="requests waiting beyond those; more get 503"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require Authorization: Bearer KEY (not on /health)"),
    max_tokens: int = typer.Option(Limits.max_tokens, "--max-tokens", min=1,
                                   help="most tokens one reply may generate; a request asking more gets 400"),
    max_prompt_tokens: int = typer.Option(Limits.max_prompt_tokens, "--max-prompt-tokens", min=1,
                                          help="most tokens of new messages one request may feed (400 beyond)"),
    max_body_mib: float = typer.Option(Limits.max_body_bytes / 2 ** 20, "--max-body-mib", min=0.001,
                                       help="largest request body, images included (413 beyond)"),
    request_timeout: float = typer.Option(Limits.timeout_s, "--request-timeout", min=0.1,
                                          help="seconds of work one request may take (408 beyond, the "
                                               "conversation left at its last completed turn)"),
    flash_attn: Optional[bool] = typer.Option(None, "--flash-attn/--no-flash-attn"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads per request (default: all)"),
    n_gpu_layers: int = NGL_OPT,
    policy_options: dict = None,
    backend: dict = None,
    memory=None,
) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) with a
    web page at /. Each conversation streams through a cache of --budget cells: any length continues, and a
    client that resends the whole history is recognised, so only the new messages are read."""
    from infmllm_gguf.extras import MissingExtra, require

    try:
        uvicorn = require("uvicorn", "serve")
        require("fastapi", "serve")
    except MissingExtra as exc:
        fail(str(exc))
    from infmllm_gguf.model_files import ModelError, cache_dir
    from infmllm_gguf.multimodal import ProjectorError
    from infmllm_gguf.runtime import Model, UnpatchedLlamaError
    from infmllm_gguf.session import SessionConfig
    from infmllm_gguf.server.app import create_app
    from infmllm_gguf.server.conversations import ConversationStore, SessionSettings, limit_malloc_arenas

    limit_malloc_arenas()
    try:
        config = SessionConfig.of(policy, chunk=chunk, n_threads=threads, flash_attn=flash_attn,
                                  cache_type_k=backend["cache_type_k"], cache_type_v=backend["cache_type_v"],
                                  memory=memory, **policy_options)
        settings = SessionSettings(config, mmproj=mmproj)
        loaded = Model(model, n_gpu_layers=n_gpu_layers, rpc=backend["rpc"])
        store = ConversationStore(loaded, settings, max_sessions=max_sessions,
                                  state_dir=state_dir or cache_dir() / "sessions", parallel=parallel, queue=queue)
        # a model without a chat template or a wrong projector fails here, not at the first request
        per_session = store.measure_session()
    except (ModelError, ProjectorError, UnpatchedLlamaError, ValueError, OSError) as exc:
        fail(str(exc))
    limits = Limits(max_tokens=max_tokens, max_body_bytes=int(max_body_mib * 2 ** 20),
                    max_prompt_tokens=max_prompt_tokens, timeout_s=request_timeout)
    server = create_app(store, model_name=loaded.path.stem, api_key=api_key, per_session_mib=per_session,
                        limits=limits)
    typer.echo(f"serving {loaded.name} on http://{host}:{port} ({settings.policy.label()}, {max_sessions} live "
               f"conversations, {per_session:.0f} MiB each); conversations saved in {store.state_dir}", err=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM (saving the conversations), then raises the signal
    # again through the handler it found: a stop that was asked for ends the process cleanly
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(server, host=host, port=port, log_level="warning")
