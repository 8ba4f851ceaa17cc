"""`infmllm-gguf bench`: speed and memory figures, measured side by side in one process, against the targets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import (MODEL_ARG, NGL_OPT, POLICY_NAMES, app, check_plot, fail, split, with_backend_options,
                     with_policy_options)

PARTS = ("capture", "stream", "kv", "rpc", "memory")

#: what the project promises (docs/PERFORMANCE.md): figure -> (comparison, limit)
TARGETS = {
    "capture overhead, prefill": ("<=", 0.03),
    "capture overhead, decode": ("<=", 0.03),
    "eviction + re-indexing share of stream time": ("<=", 0.05),
    "tokens/s, last 10% of the stream / first 10%": (">=", 0.95),
    "peak RSS growth after the first 10%": ("<=", 0.05),
    "inf-mllm / h2o tokens/s": (">=", 2.0),
    "streaming-llm / plain llama.cpp tokens/s": (">=", 0.97),
    "inf-mllm / plain llama.cpp tokens/s": (">=", 0.95),
    "memory on / off tokens/s": (">=", 0.9),
    "first answer token, memory on / off": ("<=", 2.0),
}


def against_targets(figures: list[dict]) -> list[dict]:
    """Each measured figure with its target: adds "target" (its name), "op", "limit" and "met"."""
    out = []
    for f in figures:
        op, limit = TARGETS[f["figure"]]
        met = f["value"] <= limit if op == "<=" else f["value"] >= limit
        out.append({"target": f["figure"], **{k: v for k, v in f.items() if k != "figure"},
                    "op": op, "limit": limit, "met": met})
    return out


def targets_table(rows: list[dict]) -> str:
    lines = ["targets (medians):"]
    for t in rows:
        who = f" {t['run']}" if t["run"] else ""
        lines.append(f"  {'met ' if t['met'] else 'MISS'} {t['target']}{who}: {t['value']:.4g} "
                     f"(target {t['op']} {t['limit']:g})")
    return "\n".join(lines)


@app.command()
@with_policy_options(sweep=True, defaults={"budget": "512"})
@with_backend_options
def bench(
    model: Optional[Path] = MODEL_ARG,
    synthetic: Optional[str] = typer.Option(
        None, "--synthetic", metavar="SHAPE",
        help="benchmark a random-weight model of this shape (tiny-llama, llama-1b, llama-7b, gemma3-1b), "
             "written once into <cache>/synthetic; streams random token ids"),
    synthetic_dtype: str = typer.Option("q8_0", "--synthetic-dtype", help="f32, f16, q8_0 or q4_0"),
    only: str = typer.Option("capture,stream", "--only", help=f"parts to run: {', '.join(PARTS)}"),
    policy: str = typer.Option("inf-mllm,h2o,streaming-llm,full", "--policy",
                               help=f"stream: policies, comma-separated ({POLICY_NAMES}); full fills the model's "
                                    "training context instead of a budget"),
    tokens: int = typer.Option(20000, "--tokens", min=1, help="stream: tokens streamed per run"),
    segment: int = typer.Option(1024, "--segment", min=1, help="stream: tokens per measured segment (whole chunks)"),
    reindex: bool = typer.Option(True, "--reindex/--no-reindex",
                                 help="stream: --no-reindex keeps original positions, to price re-indexing"),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline",
                                  help="stream: also stream through plain llama.cpp (StreamingLLM by seq_rm/seq_add) "
                                       "at each budget; each policy's tokens/s is reported over it"),
    kv_types: str = typer.Option("f16,q8_0,q4_0", "--kv-types",
                                 help="kv: cache types to compare with f16, each K (K and V alike) or K/V"),
    kv_budget: int = typer.Option(1024, "--kv-budget", min=1, help="kv: the default policy's budget"),
    kv_tokens: int = typer.Option(20000, "--kv-tokens", min=2, help="kv: tokens of the perplexity stream"),
    rpc_servers: int = typer.Option(2, "--rpc-servers", min=1, help="rpc: local rpc-servers to start"),
    memory_tokens: int = typer.Option(200_000, "--memory-tokens", min=1000,
                                      help="memory: tokens the memory holds at the questions"),
    memory_ranking: str = typer.Option("hidden", "--memory-ranking",
                                       help="memory: hidden, lexical, embedding or attention"),
    memory_reserve: int = typer.Option(0, "--memory-reserve", min=0,
                                       help="memory: cells of the budget that re-read text may take (0: the default)"),
    questions: int = typer.Option(10, "--questions", min=1, help="memory: questions asked, with and without it"),
    chunk: int = typer.Option(256, "--chunk", min=1, help="tokens per decode"),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", min=1, help="capture: prompt length"),
    decode_tokens: int = typer.Option(256, "--decode-tokens", min=1, help="capture: decode steps"),
    capture_queries: int = typer.Option(32, "--capture-queries", min=1,
                                        help="capture: queries captured per prompt chunk (its last ones)"),
    repeats: int = typer.Option(3, "--repeats", min=1),
    flash_attn: Optional[bool] = typer.Option(None, "--flash-attn/--no-flash-attn"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON"),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="stream: tokens/s and memory vs stream length (PNG)"),
    n_gpu_layers: int = NGL_OPT,
    policy_options: dict = None,
    backend: dict = None,
) -> None:
    """Capture overhead (prefill and decode, capture off vs on) and streaming speed, eviction time and memory
    over stream length per policy beside plain llama.cpp; with --only kv, quantized KV caches against f16;
    with --only rpc, a stream over local rpc-servers. Interleaved, medians of the repeats with [min, max]."""
    check_plot(plot_out, "--plot")
    from infmllm_gguf.bench.capture import capture_overhead
    from infmllm_gguf.bench.figures import figures
    from infmllm_gguf.bench.kv import kv_cache_bench, parse_cache_types
    from infmllm_gguf.bench.memory import memory_cost
    from infmllm_gguf.bench.rpc import rpc_bench
    from infmllm_gguf.bench.stream import plot, stream_bench
    from infmllm_gguf.model_files import ModelError
    from infmllm_gguf.policies import policy_grid
    from infmllm_gguf.synthetic import DTYPES, cached_model

    parts = split(only, str, "--only")
    if set(parts) - set(PARTS):
        fail(f"--only takes {' and/or '.join(PARTS)}, not {only!r}")
    if capture_queries > chunk:
        fail(f"--capture-queries ({capture_queries}) must not exceed the chunk ({chunk})")
    if plot_out is not None and "stream" not in parts:
        fail("--plot draws the stream part: add stream to --only")
    if synthetic is not None and model is not None:
        fail("give a MODEL or --synthetic SHAPE, not both")
    if synthetic_dtype not in DTYPES:
        fail(f"--synthetic-dtype must be one of {', '.join(DTYPES)}")
    try:
        grid = policy_grid(split(policy, str, "--policy"), policy_options) if "stream" in parts else []
        for p in grid:
            p.check_chunk(chunk)
        if synthetic is not None:
            model = cached_model(synthetic, synthetic_dtype)
        capture = stream = kv = rpc = memory = None
        if "capture" in parts:
            capture = capture_overhead(model, prompt_tokens=prompt_tokens, chunk=chunk, decode_tokens=decode_tokens,
                                         capture_queries=capture_queries, repeats=repeats, n_gpu_layers=n_gpu_layers,
                                         flash_attn=flash_attn, n_threads=threads, **backend)
            typer.echo(capture.table())
        if "stream" in parts:
            stream = stream_bench(model, policies=grid, tokens=tokens, chunk=chunk, segment=segment,
                                    repeats=repeats, source="random" if synthetic else "shakespeare", reindex=reindex,
                                    baseline=baseline, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                                    n_threads=threads, progress=True, **backend)
            typer.echo(stream.table())
        if "kv" in parts:
            kv = kv_cache_bench(model, types=parse_cache_types(split(kv_types, str, "--kv-types")),
                                  budget=kv_budget, tokens=kv_tokens, chunk=chunk,
                                  flash_attn=True if flash_attn is None else flash_attn, n_gpu_layers=n_gpu_layers,
                                  n_threads=threads, rpc=backend["rpc"], progress=True)
            typer.echo(kv.table())
        if "rpc" in parts:
            rpc = rpc_bench(model, servers=rpc_servers, tokens=tokens, chunk=chunk, repeats=repeats, n_threads=threads)
            typer.echo(rpc.table())
        if "memory" in parts:
            memory = memory_cost(model, budget=policy_options["budget"][0], tokens=tokens, memory_tokens=memory_tokens,
                                 questions=questions, chunk=chunk, repeats=repeats, ranking=memory_ranking,
                                 reserve=memory_reserve, n_threads=threads)
            typer.echo(memory.table())
    except (ModelError, FileNotFoundError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    goals = against_targets(figures(capture, stream, memory))
    typer.echo(targets_table(goals))
    if plot_out is not None:
        plot(stream, plot_out)
    if json_out is not None:
        json_out.write_text(json.dumps({
            "capture": capture.to_json() if capture else None,
            "stream": stream.to_json() if stream else None,
            "kv": kv.to_json() if kv else None,
            "rpc": rpc.to_json() if rpc else None,
            "memory": memory.to_json() if memory else None,
            "targets": goals,
        }, indent=1))
