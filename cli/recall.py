"""`infmllm-gguf recall` and `recall-chat`: can the model still answer about what left the cache?"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import (MEMORY_HELP, MODEL_ARG, NGL_OPT, POLICY_NAMES, app, check_plot, fail, memory_config, split,
                     with_policy_options)

ALL_POLICIES = "inf-mllm,h2o,streaming-llm,recent-only,context-shift,full"
FILLER_HELP = "filler text: shakespeare, kjv (`make data`), or a UTF-8 text file"


def filler_path(filler: str) -> Path:
    from infmllm_gguf.data import kjv_path, shakespeare_path

    named = {"shakespeare": shakespeare_path, "kjv": kjv_path}
    try:
        return named[filler]() if filler in named else Path(filler)
    except FileNotFoundError as exc:
        fail(str(exc))


def checkpoint_name(label: str) -> str:
    return "-".join(part.replace(" ", "") for part in label.split(", ")) + ".npz"


def run_key(policy: dict, cache_type_k: str, memory: Optional[dict]) -> str:
    """What identifies a run in the JSON file: a rerun skips the runs it holds. The granularity is
    left out: a run records what "auto" settled on, and the other options tell runs apart."""
    policy = {k: v for k, v in policy.items() if k != "granularity"}
    return json.dumps([policy, cache_type_k, memory], sort_keys=True)


RESERVE_OPT = typer.Option("0", "--memory-reserve", help="cells of the budget that re-read text may take (0: a "
                           "quarter, at most 96); comma-separated values compare them")


def memory_runs(memory: str, reserve: str) -> list:
    """The MemoryConfig (None: off) of each --memory value crossed with each --memory-reserve value."""
    reserves = split(reserve, int, "--memory-reserve")
    return [memory_config(name, r) for name in split(memory, str, "--memory")
            for r in (reserves if name != "off" else [0])]


def load_model(model: Optional[Path], n_gpu_layers: int):
    from infmllm_gguf.model_files import ModelError
    from infmllm_gguf.runtime import Model, UnpatchedLlamaError

    try:
        return Model(model, n_gpu_layers=n_gpu_layers)
    except (ModelError, UnpatchedLlamaError, ValueError) as exc:
        fail(str(exc))


def earlier_runs(json_out: Optional[Path], key: dict, from_json) -> list:
    """The runs an earlier invocation wrote to `json_out` for the same model and plan (resumed, not rerun)."""
    if json_out is None or not json_out.exists():
        return []
    try:
        data = json.loads(json_out.read_text())
    except (OSError, ValueError) as exc:
        fail(f"{json_out} exists but is not readable JSON ({exc}); move it away to start afresh")
    if {k: data.get(k) for k in key} != key:
        return []
    return [from_json(r) for r in data.get("runs", [])]


@app.command()
@with_policy_options(sweep=True, defaults={"budget": "256,512,1024"})
def recall(
    model: Optional[Path] = MODEL_ARG,
    filler: str = typer.Option("shakespeare", "--filler", help=FILLER_HELP),
    policy: str = typer.Option(ALL_POLICIES, "--policy", "-p", help=f"policies, comma-separated ({POLICY_NAMES}); "
                               "full runs once, with as much context as the model allows"),
    distances: str = typer.Option("256,512,1024,2048,4096,8192,16384", "--distances",
                                  help="distances from needle to question, in tokens, comma-separated"),
    trials: int = typer.Option(10, "--trials", min=1, help="snapshots: trials per distance"),
    spacing: int = typer.Option(1024, "--spacing", min=1, help="tokens between snapshots"),
    kinds: str = typer.Option("number,word,fact", "--kinds", help="needle kinds, rotated over the trials: number, "
                              "word, fact (verbatim); paraphrase, update, distractor, association (meaning)"),
    seed: int = typer.Option(0, "--seed", help="draws the needles and the filler's offset"),
    chunk: int = typer.Option(256, "--chunk", min=1, help="tokens decoded per step"),
    answer_tokens: int = typer.Option(8, "--answer-tokens", min=1, help="greedy tokens per answer"),
    memory: str = typer.Option("off", "--memory", help=MEMORY_HELP + "; comma-separated values compare them "
                               "(full runs without)"),
    memory_reserve: str = RESERVE_OPT,
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the runs with every answer; rerunning with "
                                            "the same file skips the runs it holds"),
    png: Optional[Path] = typer.Option(None, "--png", help="heatmap of accuracy: distance x policy and budget"),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir",
                                                  help="save each run after every snapshot and resume it from here"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    flash_attn: Optional[bool] = typer.Option(None, "--flash-attn/--no-flash-attn"),
    n_gpu_layers: int = NGL_OPT,
    policy_options: dict = None,
) -> None:
    """Hide needles (a pass key, a secret word, a fact asked in other words) in a long filler
    stream at controlled distances before snapshot points, stream it through each policy and
    budget, and ask every needle's question from the exact state at its snapshot: greedy answer,
    exact match. One stream per policy gives every trial."""
    check_plot(png, "--png")
    from tqdm import tqdm

    from infmllm_gguf.memory import memory_label
    from infmllm_gguf.perplexity import TextFileError, check_text_file
    from infmllm_gguf.policies import policy_grid
    from infmllm_gguf.recall import RecallRun, heatmap, make_plan, policies_to_run, run_recall, table, text_filler
    from infmllm_gguf.session import SessionConfig

    path = filler_path(filler)
    try:
        check_text_file(path)
        grid = policy_grid(split(policy, str, "--policy"), policy_options)
    except (TextFileError, ValueError) as exc:
        fail(str(exc))
    asked = split(distances, int, "--distances")
    memories = memory_runs(memory, memory_reserve)
    m = load_model(model, n_gpu_layers)
    offset = int(1 + seed * 7919 % 50_000)  # where the filler starts in the text, from the seed
    try:
        plan = make_plan(lambda text: m.tokenize(text, add_special=False), text_filler(m, path, offset),
                         distances=asked, trials=trials, spacing=spacing, kinds=split(kinds, str, "--kinds"),
                         seed=seed, prefix=m.tokenize("", add_special=True), filler_name=path.name)
    except (TextFileError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"{len(plan):,} stream tokens, {len(plan.needles)} needles, {len(plan.questions)} questions "
               f"({trials} per distance) on {m.name}", err=True)
    key = {"model": m.name, "plan": plan.config, "distances": list(plan.distances)}
    runs = earlier_runs(json_out, key, RecallRun.from_json)
    done = {run_key(r.policy, r.cache_type_k, r.memory) for r in runs}
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for p, mem in ((p, mem) for p in policies_to_run(grid, m.n_ctx_train, len(plan))
                   for mem in (memories if p.evicts else [None])):
        label = p.label() + memory_label(None if mem is None else mem.config())
        if run_key(p.config(), "f16", None if mem is None else mem.config()) in done:
            typer.echo(f"{label}: in {json_out} already", err=True)
            continue
        bar = tqdm(total=len(plan), unit="tok", desc=label, dynamic_ncols=True)

        def progress(run, streamed, bar=bar):
            bar.update(streamed - bar.n)
            right = sum(a.correct for a in run.answers)
            bar.set_postfix(correct=f"{right}/{len(run.answers)}", refresh=False)

        try:
            config = SessionConfig(p, chunk=chunk, n_threads=threads, flash_attn=flash_attn, memory=mem)
            run = run_recall(plan, model=m, config=config, answer_tokens=answer_tokens, progress=progress,
                             checkpoint=None if checkpoint_dir is None else checkpoint_dir / checkpoint_name(label))
        except (ValueError, RuntimeError, OSError) as exc:
            bar.close()
            fail(str(exc))
        bar.close()
        runs.append(run)
        if json_out is not None:  # after every run: an interrupted sweep keeps its runs
            json_out.write_text(json.dumps({**key, "runs": [r.to_json() for r in runs]}, indent=1))
    typer.echo(table(runs, plan.distances))
    if png is not None:
        heatmap(runs, plan.distances, png, title=f"recall on {m.name}\nfiller {path.name}, {trials} trials per cell")


@app.command("recall-chat")
@with_policy_options(sweep=True, defaults={"budget": "256,512,1024"})
def recall_chat(
    model: Optional[Path] = MODEL_ARG,
    filler: str = typer.Option("shakespeare", "--filler", help=FILLER_HELP),
    policy: str = typer.Option("inf-mllm,h2o,streaming-llm,context-shift", "--policy", "-p",
                               help=f"policies, comma-separated ({POLICY_NAMES})"),
    rounds: int = typer.Option(300, "--rounds", min=1, help="rounds of conversation"),
    facts: int = typer.Option(10, "--facts", min=1, help="facts told in round 1 (trials per probe)"),
    kinds: str = typer.Option("number,word,fact", "--kinds", help="fact kinds, rotated over the facts (as recall's)"),
    probes: str = typer.Option(",".join(map(str, (1, 2, 5, 10, 20, 50, 100, 200, 300))), "--probes",
                               help="rounds after which every fact is asked"),
    seed: int = typer.Option(0, "--seed"),
    chunk: int = typer.Option(256, "--chunk", min=1),
    memory: str = typer.Option("off", "--memory", help=MEMORY_HELP + "; comma-separated values compare them"),
    memory_reserve: str = RESERVE_OPT,
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the runs; rerunning skips the runs it holds"),
    png: Optional[Path] = typer.Option(None, "--png", help="facts recalled against rounds, one line per run"),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    n_gpu_layers: int = NGL_OPT,
    policy_options: dict = None,
) -> None:
    """Tell facts in round 1 of a conversation, go on for N rounds through the chat template, and
    ask each fact after the probe rounds: how many rounds until a round-1 fact is lost?"""
    check_plot(png, "--png")
    from tqdm import tqdm

    from infmllm_gguf.memory import memory_label
    from infmllm_gguf.perplexity import TextFileError, check_text_file
    from infmllm_gguf.policies import policy_grid
    from infmllm_gguf.recall import ChatRecallRun, make_chat_plan, plot_chat, run_chat_recall
    from infmllm_gguf.session import SessionConfig

    path = filler_path(filler)
    try:
        check_text_file(path)
        grid = policy_grid(split(policy, str, "--policy"), policy_options)
        plan = make_chat_plan(path, rounds=rounds, facts=facts, probes=split(probes, int, "--probes"), seed=seed,
                              kinds=split(kinds, str, "--kinds"))
    except (TextFileError, ValueError) as exc:
        fail(str(exc))
    memories = memory_runs(memory, memory_reserve)
    m = load_model(model, n_gpu_layers)
    if m.chat_template() is None:
        fail(f"{m.name} has no chat template: the chat variant needs an instruct model")
    key = {"model": m.name, "plan": plan.config}
    runs = earlier_runs(json_out, key, ChatRecallRun.from_json)
    done = {run_key(r.policy, "f16", r.memory) for r in runs}
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for p, mem in ((p, mem) for p in grid for mem in (memories if p.evicts else [None])):
        label = p.label() + memory_label(None if mem is None else mem.config())
        if run_key(p.config(), "f16", None if mem is None else mem.config()) in done:
            continue
        bar = tqdm(total=max(plan.probes), unit="round", desc=label, dynamic_ncols=True)

        def progress(run, bar=bar):
            bar.update(run.rounds_done - bar.n)
            right = sum(a.correct for a in run.answers)
            bar.set_postfix(correct=f"{right}/{len(run.answers)}", refresh=False)

        try:
            config = SessionConfig(p, chunk=chunk, n_threads=threads, memory=mem)
            run = run_chat_recall(plan, model=m, config=config, progress=progress,
                                  checkpoint=None if checkpoint_dir is None
                                  else checkpoint_dir / ("chat-" + checkpoint_name(label)))
        except (ValueError, RuntimeError, OSError) as exc:
            bar.close()
            fail(str(exc))
        bar.close()
        runs.append(run)
        if json_out is not None:
            json_out.write_text(json.dumps({**key, "runs": [r.to_json() for r in runs]}, indent=1))
    width = max(len(r.label()) for r in runs)
    typer.echo(f"{'policy':{width}s}  " + " ".join(f"{p:>6d}" for p in plan.probes) + "  lost at round")
    for r in runs:
        acc = r.accuracy()
        typer.echo(f"{r.label():{width}s}  " + " ".join(f"{acc[p][0]:>3d}/{acc[p][1]:<2d}" if p in acc else "     -"
                                                       for p in plan.probes) + f"  {r.lost_at() or 'never'}")
    if png is not None:
        plot_chat(runs, png, title=f"chat recall on {m.name}: {facts} facts told in round 1")
