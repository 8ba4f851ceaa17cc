"""The `infmllm-gguf` command: a thin layer over the library's functions, one module per command."""
from . import attention, bench, chat, perplexity, recall, rpc_server, serve  # noqa: F401  (each module registers its command on `app`)
from .common import app

if __name__ == "__main__":
    app()
