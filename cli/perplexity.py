"""`infmllm-gguf perplexity`: perplexity of a long text through the bounded cache, policy by policy."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import typer

from .common import (MODEL_ARG, NGL_OPT, POLICY_NAMES, app, check_plot, fail, split, with_backend_options,
                     with_memory_options, with_policy_options)


@app.command()
@with_policy_options(sweep=True)
@with_backend_options
@with_memory_options(default="off")
def perplexity(
    model: Optional[Path] = MODEL_ARG,
    file: Path = typer.Option(..., "--file", "-f", help="text to stream: UTF-8 .txt, or .gz of one"),
    policy: str = typer.Option("inf-mllm,streaming-llm,h2o,context-shift", "--policy", "-p",
                               help=f"policies, comma-separated ({POLICY_NAMES})"),
    chunk: int = typer.Option(256, "--chunk", min=1, help="tokens decoded per step"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", min=2, help="stop after N tokens"),
    segment: int = typer.Option(1024, "--segment", min=1, help="tokens per point of the curve"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the runs (with curves) as a JSON list"),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="write one CSV row per run"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of perplexity and memory vs tokens"),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir",
                                                  help="save each run here as it goes and resume it from here"),
    checkpoint_every: int = typer.Option(50_000, "--checkpoint-every", min=1),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    flash_attn: Optional[bool] = typer.Option(None, "--flash-attn/--no-flash-attn"),
    n_gpu_layers: int = NGL_OPT,
    policy_options: dict = None,
    backend: dict = None,
    memory=None,
) -> None:
    """Stream a text chunk by chunk and score every token given the bounded cache, for each
    combination of policy and option values; `full` runs while the text fits its budget and the
    model's context. With --memory the stream is also recorded (no prompt re-reads it: the same
    scores, its cost in tokens/s)."""
    check_plot(plot, "--plot")
    from tqdm import tqdm

    from infmllm_gguf.model_files import ModelError
    from infmllm_gguf.perplexity import TextFileError, check_text_file, plot_runs, stream_perplexity, table
    from infmllm_gguf.policies import policy_grid
    from infmllm_gguf.runtime import UnpatchedLlamaError
    from infmllm_gguf.session import SessionConfig

    try:
        check_text_file(file)
        grid = policy_grid(split(policy, str, "--policy"), policy_options)
    except (TextFileError, ValueError) as exc:
        fail(str(exc))
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for p in grid:
        name = "-".join(part.replace(" ", "") for part in p.label().split(", "))  # the checkpoint's
        if (backend["cache_type_k"], backend["cache_type_v"]) != ("f16", "f16"):
            name += f"-kv{backend['cache_type_k']}-{backend['cache_type_v']}"
        run_memory = memory if p.evicts else None  # nothing evicted: no memory
        if run_memory is not None:
            name += f"-memory{run_memory.ranking}"
        bar = tqdm(total=max_tokens, unit="tok", desc=p.label(), dynamic_ncols=True, leave=True)

        def progress(run, done, bar=bar):
            bar.update(done - bar.n)
            bar.set_postfix(ppl=f"{run.ppl:.2f}", cells=run.peak_cells, refresh=False)

        try:
            config = SessionConfig(p, chunk=chunk, n_threads=threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                                   memory=run_memory, **backend)
            run = stream_perplexity(
                file, model=model, config=config, max_tokens=max_tokens, segment=segment, progress=progress,
                checkpoint=None if checkpoint_dir is None else checkpoint_dir / f"{name}.npz",
                checkpoint_every=checkpoint_every)
        except (ModelError, UnpatchedLlamaError, TextFileError, ValueError, FileNotFoundError) as exc:
            bar.close()
            fail(str(exc))
        bar.close()
        if run.stop_note():
            typer.echo(run.stop_note(), err=True)
        runs.append(run)
        write_outputs(runs, model, file, json_out, csv_out)  # after every run: an interrupted sweep keeps its runs
    typer.echo(table(runs))
    if plot is not None:
        plot_runs(runs, plot, title=f"{file.name}")


def write_outputs(runs, model: Optional[Path], file: Path, json_out: Optional[Path], csv_out: Optional[Path]) -> None:
    from infmllm_gguf.model_files import resolve_model
    from infmllm_gguf.perplexity import csv_fields, csv_row

    where = {"model": str(resolve_model(model)), "file": str(file)}
    if json_out is not None:
        json_out.write_text(json.dumps([{**where, **r.to_json()} for r in runs], indent=1))
    if csv_out is not None:
        with open(csv_out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["model", "file", *csv_fields()], extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**where, **csv_row(r)} for r in runs)
