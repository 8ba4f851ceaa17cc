"""`infmllm-gguf bench`: speed figures, measured side by side in one process."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import MODEL_ARG, NGL_OPT, app, fail


@app.command()
def bench(
    model: Optional[Path] = MODEL_ARG,
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", min=1),
    chunk: int = typer.Option(256, "--chunk", min=1),
    decode_tokens: int = typer.Option(64, "--decode-tokens", min=1),
    window: int = typer.Option(32, "--window", "-w", min=1),
    repeats: int = typer.Option(5, "--repeats", min=1),
    flash_attn: Optional[bool] = typer.Option(None, "--flash-attn/--no-flash-attn"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON"),
    n_gpu_layers: int = NGL_OPT,
) -> None:
    """Capture overhead: prefill and decode tokens/s with score capture off vs on, interleaved."""
    from infmllm_gguf.bench import capture_overhead
    from infmllm_gguf.models import ModelError

    if window > chunk:
        fail(f"the window ({window}) must not exceed the chunk ({chunk})")
    try:
        result = capture_overhead(model, prompt_tokens=prompt_tokens, chunk=chunk, decode_tokens=decode_tokens,
                                  window=window, repeats=repeats, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn)
    except (ModelError, ValueError) as exc:
        fail(str(exc))
    typer.echo(result.table())
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_json(), indent=2))
