"""The `infmllm-gguf` command: a thin layer over the library's functions, one module per command."""
import sys

import typer

from infmllm_gguf.extras import MissingExtra

from . import attention, bench, chat, perplexity, recall, rpc_server, serve  # noqa: F401  (each module registers its command on `app`)
from .common import app


def main() -> None:
    """The console script: `app`, with an extra that a command found missing said in one line."""
    try:
        app()
    except MissingExtra as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
