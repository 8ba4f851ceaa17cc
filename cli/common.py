"""What every `infmllm-gguf` command shares: the Typer app, common options, the policy flags, error exit."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from infmllm_gguf.extras import MissingExtra, pyplot
from infmllm_gguf.policies import POLICIES, declared_options

# no markup: help texts are plain (rich would eat "[min, max]" as a tag)
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Streaming inference of GGUF models in a KV cache of fixed size (Inf-MLLM).")

MODEL_ARG = typer.Argument(None, help="GGUF model file (default: SmolLM2-135M-Instruct, installed by `make setup`)")
NGL_OPT = typer.Option(-1, "--n-gpu-layers", "-ngl", help="layers to offload to the GPU (-1: all)")
POLICY_NAMES = ", ".join(POLICIES)
SHORT_FLAGS = {"budget": "-b", "window": "-w"}  # as the commands always had them


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def check_plot(path: Optional[Path], flag: str) -> None:
    """Before any work: a plot asked for (`flag`) needs matplotlib (the [plot] extra)."""
    if path is not None:
        try:
            pyplot(flag)
        except MissingExtra as exc:
            fail(str(exc))


def split(text: str, kind: type, flag: str) -> list:
    """The values of a comma-separated flag."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} takes a comma-separated list of {kind.__name__}s, not {text!r}")
    if not values:
        fail(f"{flag} is empty")
    return values


def with_policy_options(*, sweep: bool, defaults: dict[str, str] | None = None) -> Callable:
    """Give a command one flag per policy option, as the policies declare them (type, help, each
    policy's default), so that a new option needs no edit here. The command receives them as
    `policy_options`: {name: value} with `sweep` False, {name: [values]} (comma-separated on the
    command line) with `sweep` True; only the flags given, and those in `defaults` (the command's
    own defaults, as they would be typed)."""
    declared = declared_options()
    defaults = defaults or {}

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        params = [p for name, p in signature.parameters.items() if name != "policy_options"]
        for d in declared.values():
            flag = "--" + d.name.replace("_", "-")
            help_text = d.describe() + ("; comma-separated values sweep it" if sweep else "")
            if d.name in defaults:
                help_text += f"; here {defaults[d.name]} by default"
            params.append(inspect.Parameter(
                d.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str] if sweep else Optional[d.type],
                default=typer.Option(None, flag, *([SHORT_FLAGS[d.name]] if d.name in SHORT_FLAGS else []),
                                     help=help_text, show_default=False)))

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in declared}
            options = {}
            for name, value in given.items():
                value = defaults.get(name) if value is None else value
                if value is None:
                    continue
                kind = declared[name].type
                flag = "--" + name.replace("_", "-")
                options[name] = split(value, kind, flag) if sweep else value
            return command(**kwargs, policy_options=options)

        wrapper.__signature__ = signature.replace(parameters=params)
        return wrapper
    return decorate


def with_backend_options(command: Callable) -> Callable:
    """Give a command llama.cpp's KV cache type flags (`--cache-type-k/-ctk`, `--cache-type-v/-ctv`)
    and `--rpc HOST:PORT[,...]`, checked; the command receives them as `backend`:
    {"cache_type_k", "cache_type_v", "rpc"}, keywords of `StreamSession` and the library's runs."""
    from infmllm_gguf.runtime import CACHE_TYPES

    types = "/".join(CACHE_TYPES)
    extra = [
        ("cache_type_k", str, typer.Option("f16", "--cache-type-k", "-ctk", help=f"KV cache type of K: {types}")),
        ("cache_type_v", str, typer.Option("f16", "--cache-type-v", "-ctv",
                                           help=f"KV cache type of V: {types} (quantized V needs flash attention)")),
        ("rpc", Optional[str], typer.Option(None, "--rpc", metavar="HOST:PORT[,HOST:PORT...]",
                                            help="put the model's layers on these rpc-servers (`infmllm-gguf "
                                                 "rpc-server` starts one)")),
    ]

    def backend(given: dict, kwargs: dict) -> dict:
        from infmllm_gguf.runtime import check_cache_types, parse_endpoint

        given["rpc"] = tuple(e.strip() for e in (given["rpc"] or "").split(",") if e.strip())
        try:
            check_cache_types(given["cache_type_k"], given["cache_type_v"], kwargs.get("flash_attn"))
            for endpoint in given["rpc"]:
                parse_endpoint(endpoint)
        except ValueError as exc:
            fail(str(exc))
        return given

    return with_extra_options(command, extra, "backend", backend)


def with_extra_options(command: Callable, extra: list[tuple[str, Any, Any]], receive_as: str,
                       make: Callable[[dict, dict], Any]) -> Callable:
    """`command` with the keyword options `extra` ((name, type, typer.Option) each) added to its
    signature; it receives them as one argument `receive_as`: `make(given, other_kwargs)`."""
    signature = inspect.signature(command)
    params = [p for name, p in signature.parameters.items() if name != receive_as]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)
               for name, kind, default in extra]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name, _, _ in extra}
        return command(**kwargs, **{receive_as: make(given, kwargs)})

    wrapper.__signature__ = signature.replace(parameters=params)
    return wrapper

MEMORY_HELP = ("the memory tier beyond the budget: off, or how each prompt ranks the stream's past (hidden: the "
               "model's hidden states, the prompt's tokens matched to each block's by meaning; lexical: BM25; "
               "embedding: BM25 that counts words near the prompt's in the model's embedding table; attention: BM25 "
               "reranked by the prompt's attention), or where it keeps it (ram or disk: the hidden ranking, with "
               "--memory-store ram or disk); what ranks best is re-read before the prompt")


def memory_config(ranking: str, reserve: int = 0, cap: int = 4_000_000, store: str = "ram",
                  directory: Optional[str] = None):
    """The MemoryConfig of `--memory RANKING` (None for off; `ram` and `disk` name the store, with the
    default ranking), or exit 2 with the reason."""
    from infmllm_gguf.memory import MemoryConfig

    if ranking == "off":
        return None
    if ranking in ("ram", "disk"):
        ranking, store = MemoryConfig.ranking, ranking
    try:
        return MemoryConfig(ranking=ranking, reserve=reserve, cap=cap, store=store, directory=directory)
    except ValueError as exc:
        fail(str(exc))


def with_memory_options(default: str) -> Callable:
    """Give a command `--memory`, `--memory-reserve`, `--memory-cap`, `--memory-store` and
    `--memory-dir`; it receives `memory`: a MemoryConfig or None."""
    extra = [
        ("memory_ranking", str, typer.Option(default, "--memory", help=MEMORY_HELP)),
        ("memory_reserve", int, typer.Option(0, "--memory-reserve", min=0,
                                             help="cells of the budget that re-read text may take (0: a quarter, "
                                                  "at most 96)")),
        ("memory_cap", int, typer.Option(4_000_000, "--memory-cap", min=2,
                                         help="stream tokens the memory keeps in RAM (12 bytes each); beyond, the "
                                              "oldest go to disk (--memory-store disk) or are dropped")),
        ("memory_store", str, typer.Option("ram", "--memory-store", help="ram, or disk: beyond --memory-cap, a file")),
        ("memory_dir", Optional[str], typer.Option(None, "--memory-dir",
                                                   help="where --memory-store disk writes (default <cache>/memory)")),
    ]

    def memory(given: dict, kwargs: dict):
        return memory_config(*given.values())

    return lambda command: with_extra_options(command, extra, "memory", memory)
