"""`infmllm-gguf attention`: which tokens the last queries attend to."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import MODEL_ARG, NGL_OPT, app, check_plot, fail, with_backend_options


@app.command()
@with_backend_options
def attention(
    model: Optional[Path] = MODEL_ARG,
    text: Optional[str] = typer.Option(None, "--text", help="text to decode"),
    file: Optional[Path] = typer.Option(None, "--file", help="file with the text to decode"),
    window: int = typer.Option(32, "--window", "-w", min=1, help="retrieval window: the last W tokens' queries"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
    png: Optional[Path] = typer.Option(None, "--png", help="write a layers x positions heatmap"),
    flash_attn: Optional[bool] = typer.Option(None, "--flash-attn/--no-flash-attn", help="default: llama.cpp's choice"),
    n_gpu_layers: int = NGL_OPT,
    backend: dict = None,
) -> None:
    """Decode a text and report how much attention each token receives from the last W queries."""
    check_plot(png, "--png")
    from infmllm_gguf.attention import plot_heatmap, text_attention
    from infmllm_gguf.model_files import ModelError
    from infmllm_gguf.runtime import UnpatchedLlamaError

    if (text is None) == (file is None):
        fail("give exactly one of --text and --file")
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {file} as UTF-8 text: {exc}")
    try:
        result = text_attention(text, model=model, window=window, n_gpu_layers=n_gpu_layers,
                                flash_attn=flash_attn, **backend)
    except (ModelError, UnpatchedLlamaError, ValueError) as exc:
        fail(str(exc))
    if png is not None:
        plot_heatmap(result, png)
    if as_json:
        json.dump(result.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        typer.echo(result.summary())
        if png is not None:
            typer.echo(f"heatmap: {png}")
