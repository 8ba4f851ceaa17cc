"""`infmllm-gguf bench`: speed and memory figures, measured side by side in one process."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import MODEL_ARG, NGL_OPT, app, fail

PARTS = ("capture", "stream")


def split(value: str, kind=str) -> list:
    try:
        return [kind(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        fail(f"cannot read {value!r} as a comma-separated list")


@app.command()
def bench(
    model: Optional[Path] = MODEL_ARG,
    synthetic: Optional[str] = typer.Option(
        None, "--synthetic", metavar="SHAPE",
        help="benchmark a random-weight model of this shape (tiny-llama, llama-1b, llama-7b, gemma3-1b), "
             "written once into <cache>/synthetic; streams random token ids"),
    synthetic_dtype: str = typer.Option("q8_0", "--synthetic-dtype", help="f32, f16, q8_0 or q4_0"),
    only: str = typer.Option(",".join(PARTS), "--only", help="parts to run: capture, stream"),
    policy: str = typer.Option("inf-mllm,h2o,streaming-llm,full", "--policy", help="stream: policies (P[,P...])"),
    budget: str = typer.Option("512", "--budget", help="stream: cells kept (N[,N...]); full fills the model's "
                                                        "training context instead"),
    tokens: int = typer.Option(20000, "--tokens", min=1, help="stream: tokens streamed per run"),
    segment: int = typer.Option(1024, "--segment", min=1, help="stream: tokens per measured segment (whole chunks)"),
    reindex: bool = typer.Option(True, "--reindex/--no-reindex",
                                 help="stream: --no-reindex keeps original positions, to price re-indexing"),
    chunk: int = typer.Option(256, "--chunk", min=1, help="tokens per decode"),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", min=1, help="capture: prompt length"),
    decode_tokens: int = typer.Option(64, "--decode-tokens", min=1, help="capture: decode steps"),
    window: int = typer.Option(32, "--window", "-w", min=1, help="capture: queries captured per prompt chunk"),
    repeats: int = typer.Option(3, "--repeats", min=1),
    flash_attn: Optional[bool] = typer.Option(None, "--flash-attn/--no-flash-attn"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON"),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="stream: tokens/s and memory vs stream length (PNG)"),
    n_gpu_layers: int = NGL_OPT,
) -> None:
    """Capture overhead (prefill and decode, capture off vs on) and streaming speed, eviction time and memory
    over stream length per policy; interleaved, medians of the repeats with [min, max]."""
    from infmllm_gguf import bench as b
    from infmllm_gguf.models import ModelError
    from infmllm_gguf.synthetic import DTYPES

    parts = split(only)
    if not parts or set(parts) - set(PARTS):
        fail(f"--only takes {' and/or '.join(PARTS)}, not {only!r}")
    if window > chunk:
        fail(f"the window ({window}) must not exceed the chunk ({chunk})")
    if plot_out is not None and "stream" not in parts:
        fail("--plot draws the stream part: add stream to --only")
    if synthetic is not None and model is not None:
        fail("give a MODEL or --synthetic SHAPE, not both")
    if synthetic_dtype not in DTYPES:
        fail(f"--synthetic-dtype must be one of {', '.join(DTYPES)}")
    try:
        runs = b.stream_runs(split(policy), split(budget, int)) if "stream" in parts else []
        if synthetic is not None:
            model = b.synthetic_model(synthetic, synthetic_dtype)
        capture = stream = None
        if "capture" in parts:
            capture = b.capture_overhead(model, prompt_tokens=prompt_tokens, chunk=chunk, decode_tokens=decode_tokens,
                                         window=window, repeats=repeats, n_gpu_layers=n_gpu_layers,
                                         flash_attn=flash_attn, n_threads=threads)
            typer.echo(capture.table())
        if "stream" in parts:
            stream = b.stream_bench(model, runs=runs, tokens=tokens, chunk=chunk, segment=segment, repeats=repeats,
                                    source="random" if synthetic else "shakespeare", reindex=reindex,
                                    n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, n_threads=threads,
                                    progress=True)
            typer.echo(stream.table())
    except (ModelError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    goals = b.targets(capture, stream)
    typer.echo(b.targets_table(goals))
    if plot_out is not None:
        b.plot(stream, plot_out)
    if json_out is not None:
        json_out.write_text(json.dumps({
            "capture": capture.to_json() if capture else None,
            "stream": stream.to_json() if stream else None,
            "targets": goals,
        }, indent=1))
