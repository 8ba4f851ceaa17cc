"""The optional extras of pyproject.toml: their packages are imported on first use, and a missing
one is an ImportError that names the extra to install, in one line."""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"fastapi": "server", "uvicorn": "server", "pydantic": "server", "av": "video", "matplotlib": "plot"}


class MissingExtra(ImportError):
    """A package of an extra that is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """`module`, imported; MissingExtra saying which extra `purpose` (what needs it) takes."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the package is there but something it imports is broken: not ours to explain
        raise MissingExtra(f"{purpose} needs {top}, which is not installed: "
                           f"pip install 'infmllm-gguf[{EXTRAS[top]}]'") from None


def pyplot(purpose: str) -> ModuleType:
    """matplotlib's pyplot, drawing to files (no display)."""
    require("matplotlib", purpose).use("Agg")
    return require("matplotlib.pyplot", purpose)
