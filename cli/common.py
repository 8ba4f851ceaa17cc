"""What every `infmllm-gguf` command shares: the Typer app, common options, error exit."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Streaming inference of GGUF models in a KV cache of fixed size (Inf-MLLM).")

MODEL_ARG = typer.Argument(None, help="GGUF model file (default: SmolLM2-135M-Instruct, installed by `make setup`)")
NGL_OPT = typer.Option(-1, "--n-gpu-layers", "-ngl", help="layers to offload to the GPU (-1: all)")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)
