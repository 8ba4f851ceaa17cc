"""`infmllm-gguf perplexity`: perplexity of a long text through the bounded cache, policy by policy."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import typer

from .common import MODEL_ARG, NGL_OPT, app, fail


def parse_list(text: Optional[str], kind: type, option: str) -> list:
    if text is None:
        return []
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option} takes a comma-separated list of {kind.__name__}s, not {text!r}")
    if not values:
        fail(f"{option} is empty")
    return values


@app.command()
def perplexity(
    model: Optional[Path] = MODEL_ARG,
    file: Path = typer.Option(..., "--file", "-f", help="text to stream: UTF-8 .txt, or .gz of one"),
    policy: str = typer.Option("inf-mllm,streaming-llm,h2o,context-shift", "--policy", "-p",
                               help="policies, comma-separated (inf-mllm, h2o, streaming-llm, window, "
                                    "context-shift, full)"),
    budget: str = typer.Option("1024", "--budget", "-b", help="cache budgets in cells, comma-separated"),
    chunk: int = typer.Option(256, "--chunk", min=1, help="tokens decoded per step"),
    window: Optional[str] = typer.Option(None, "--window", "-w", help="retrieval windows (inf-mllm), comma-separated"),
    bias: Optional[str] = typer.Option(None, "--bias", help="attention biases (inf-mllm), comma-separated"),
    recent: Optional[str] = typer.Option(None, "--recent", help="recent tokens always kept, comma-separated"),
    sinks: Optional[str] = typer.Option(None, "--sinks", help="first tokens always kept, comma-separated"),
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
) -> None:
    """Stream a text chunk by chunk and score every token given the bounded cache, for each
    combination of policy, budget and setting; `full` runs while the text fits the model's context."""
    from tqdm import tqdm

    from infmllm_gguf.models import ModelError
    from infmllm_gguf.native import UnpatchedLlamaError
    from infmllm_gguf.perplexity import (TextFileError, check_text_file, plot_runs, run_grid, stream_perplexity,
                                         table)

    sweeps = {"window": parse_list(window, int, "--window"), "bias": parse_list(bias, float, "--bias"),
              "recent": parse_list(recent, int, "--recent"), "sinks": parse_list(sinks, int, "--sinks")}
    try:
        check_text_file(file)
        specs = run_grid(parse_list(policy, str, "--policy"), parse_list(budget, int, "--budget"), sweeps)
    except (TextFileError, ValueError) as exc:
        fail(str(exc))
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec in specs:
        bar = tqdm(total=max_tokens, unit="tok", desc=spec.name, dynamic_ncols=True, leave=True)

        def progress(run, done, bar=bar):
            bar.update(done - bar.n)
            bar.set_postfix(ppl=f"{run.ppl:.2f}", cells=run.peak_cells, refresh=False)

        try:
            run = stream_perplexity(
                file, model_path=model, policy=spec.policy, budget=spec.budget, chunk=chunk, max_tokens=max_tokens,
                segment=segment, progress=progress, n_threads=threads, n_gpu_layers=n_gpu_layers,
                flash_attn=flash_attn, checkpoint=None if checkpoint_dir is None else checkpoint_dir / f"{spec.name}.npz",
                checkpoint_every=checkpoint_every, **dict(spec.settings))
        except (ModelError, UnpatchedLlamaError, TextFileError, ValueError, FileNotFoundError) as exc:
            bar.close()
            fail(str(exc))
        bar.close()
        runs.append(run)
        write_outputs(runs, model, file, json_out, csv_out)  # after every run: an interrupted sweep keeps its runs
    typer.echo(table(runs))
    if plot is not None:
        plot_runs(runs, plot, title=f"{file.name}")


def write_outputs(runs, model: Optional[Path], file: Path, json_out: Optional[Path], csv_out: Optional[Path]) -> None:
    from infmllm_gguf.models import resolve_model
    from infmllm_gguf.perplexity import CSV_FIELDS

    records = [{"model": str(resolve_model(model)), "file": str(file), **r.to_json()} for r in runs]
    if json_out is not None:
        json_out.write_text(json.dumps(records, indent=1))
    if csv_out is not None:
        with open(csv_out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["model", "file", *CSV_FIELDS], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
