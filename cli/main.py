"""The `infmllm-gguf` command: a thin layer over the library's functions."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Streaming inference of GGUF models in a KV cache of fixed size (Inf-MLLM).")

MODEL_ARG = typer.Argument(None, help="GGUF model file (default: SmolLM2-135M-Instruct, installed by `make setup`)")
NGL_OPT = typer.Option(-1, "--n-gpu-layers", "-ngl", help="layers to offload to the GPU (-1: all)")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def attention(
    model: Optional[Path] = MODEL_ARG,
    text: Optional[str] = typer.Option(None, "--text", help="text to decode"),
    file: Optional[Path] = typer.Option(None, "--file", help="file with the text to decode"),
    window: int = typer.Option(32, "--window", "-w", min=1, help="retrieval window: the last W tokens' queries"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
    png: Optional[Path] = typer.Option(None, "--png", help="write a layers x positions heatmap"),
    flash_attn: Optional[bool] = typer.Option(None, "--flash-attn/--no-flash-attn", help="default: llama.cpp's choice"),
    n_gpu_layers: int = NGL_OPT,
) -> None:
    """Decode a text and report how much attention each token receives from the last W queries."""
    from infmllm_gguf.attention import plot_heatmap, text_attention
    from infmllm_gguf.models import ModelError
    from infmllm_gguf.native import UnpatchedLlamaError

    if (text is None) == (file is None):
        fail("give exactly one of --text and --file")
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {file} as UTF-8 text: {exc}")
    try:
        result = text_attention(text, model_path=model, window=window, n_gpu_layers=n_gpu_layers,
                                flash_attn=flash_attn)
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


if __name__ == "__main__":
    app()
