"""Run a recall plan through one policy: stream it, and at each snapshot ask every question from that
exact state (`StreamSession.snapshot` / `rollback`), greedy, scored by exact match.

The question comes after the stream, so eviction cannot know it, as in any real stream. A run
saves its state after every snapshot (`checkpoint=`) and resumes from there; `full` runs while the
stream fits its budget and the model's training context (`stopped_at`).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..memory import memory_label
from ..perplexity import NO_MEMORY, PolicyRun, file_tokens, slice_tokens
from ..policies import Policy
from ..runtime import Model
from ..session import SessionConfig, StreamSession
from .needles import exact_match
from .plan import RecallPlan

FEED_PIECE = 4096  # tokens fed between progress reports (and checkpoint checks)


def text_filler(model: Model, path: str | os.PathLike, offset: int) -> Callable[[int], list[int]]:
    """`filler(n)`: n tokens of the text file from token `offset` on, the text read again from its
    start (without its BOS) if it runs out."""
    def filler(n: int) -> list[int]:
        out: list[int] = []
        start = offset
        while len(out) < n:
            got = len(out)
            for block in slice_tokens(file_tokens(model, path), start, start + n - len(out)):
                out.extend(block)
            if len(out) == got:
                raise ValueError(f"{path} gives no tokens past {start}")
            start = 1  # wrap around, after the BOS
        return out
    return filler


@dataclass
class Answer:
    snapshot: int
    needle: int
    kind: str
    target: int       # the distance bin
    distance: int     # tokens from the needle's start to the question
    reply: str
    correct: bool
    kept: float       # share of the needle's tokens that some layer still held at the snapshot


@dataclass
class RecallRun(PolicyRun):
    policy: dict               # Policy.config()
    chunk: int
    plan: dict                 # RecallPlan.config: which stream was asked
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    snapshots_done: int = 0
    tokens_streamed: int = 0
    seconds: float = 0.0
    stopped_at: int | None = None  # full: the first snapshot whose stream did not fit
    answers: list[Answer] = field(default_factory=list)
    memory: dict | None = None     # MemoryConfig.config() of the memory tier; None: off
    recall_s: float = 0.0          # the memory's ranking and re-reading, all questions together
    tokens_recalled: int = 0

    def label(self) -> str:
        return super().label() + memory_label(self.memory)

    def accuracy(self, by: str = "target") -> dict:
        """{value of `by` (an Answer field, or a tuple of them): (correct, trials)}."""
        keys = (by,) if isinstance(by, str) else tuple(by)
        out: dict = {}
        for a in self.answers:
            k = tuple(getattr(a, f) for f in keys)
            k = k[0] if len(k) == 1 else k
            right, n = out.get(k, (0, 0))
            out[k] = (right + a.correct, n + 1)
        return dict(sorted(out.items()))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RecallRun":
        return run_from_json(cls, Answer, data)


def run_from_json(cls: type, answer: type, data: dict):
    """A run record (`cls`, a dataclass with a list of `answer` records in `answers`) from its
    JSON; keys it does not know are left out."""
    names = {f.name for f in fields(cls)} - {"answers"}
    return cls(**{k: v for k, v in data.items() if k in names},
               answers=[answer(**a) for a in data.get("answers", [])])


def ask(session: StreamSession, prompt: str, answer_tokens: int, *, recall: bool = True) -> str:
    """Feed `prompt` (with `recall`, the memory, if any, re-reads what it asks for first) and return
    the greedy continuation (up to `answer_tokens` tokens, cut at a newline)."""
    if recall:
        session.feed_prompt(prompt)
    else:
        session.feed_text(prompt)
    return "".join(session.generate(max_tokens=answer_tokens, temperature=0, stop=("\n",)))


def kept_share(cached: np.ndarray, start: int, end: int) -> float:
    """The share of stream indices [start, end) in the sorted `cached`."""
    return float(np.count_nonzero((cached >= start) & (cached < end)) / max(end - start, 1))


def run_recall(plan: RecallPlan, *, model: Model | str | os.PathLike | None = None,
               config: SessionConfig = NO_MEMORY, answer_tokens: int = 8,
               checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 50_000,
               progress: Callable[[RecallRun, int], None] | None = None) -> RecallRun:
    """Stream `plan` through a session made as `config` says and answer its questions at each
    snapshot. `checkpoint`: a file the run saves itself to after each snapshot and resumes from
    (refused if it holds another plan or settings), and every `checkpoint_every` tokens of stream.
    `progress(run, tokens_streamed)` is called as the stream goes. `config.memory` (off by default):
    the memory tier, which re-reads before each question."""
    with StreamSession.from_config(model, config) as session:
        run = RecallRun(policy=session.policy.config(), chunk=config.chunk, plan=plan.config,
                        cache_type_k=config.cache_type_k, cache_type_v=config.cache_type_v,
                        memory=None if session.memory is None else session.memory.config.config())
        if checkpoint is not None and Path(checkpoint).exists():
            saved = RecallRun.from_json(session.load(checkpoint)["run"])
            if saved.plan != plan.config:
                raise ValueError(f"{checkpoint} holds a run of another recall plan ({saved.plan}); "
                                 f"this one is {plan.config}: remove it or use another --checkpoint-dir")
            run = saved
        limit = None
        if not session.policy.evicts:
            limit = min(session.policy.budget, session.model.n_ctx_train)
        t_start = time.perf_counter() - run.seconds
        last_save = run.tokens_streamed
        for k in range(run.snapshots_done, len(plan.snapshots)):
            end = plan.snapshots[k]
            questions = plan.questions_at(k)
            room = max(len(session.tokenize(plan.needles[q.needle].needle.prompt())) for q in questions)
            if limit is not None and end + room + answer_tokens > limit:
                run.stopped_at = end
                break
            for done in _feed(session, plan.tokens, end):
                run.tokens_streamed = done
                run.seconds = time.perf_counter() - t_start
                if checkpoint is not None and done - last_save >= checkpoint_every:
                    session.save(checkpoint, extra={"run": run.to_json()})  # mid-stream: resumes here
                    last_save = done
                if progress is not None:
                    progress(run, done)
            state = session.snapshot()
            cached = session.cached_stream_indices()
            for i, q in enumerate(questions):
                if i:
                    session.rollback(state)
                placed = plan.needles[q.needle]
                reply = ask(session, placed.needle.prompt(), answer_tokens)
                if session.memory is not None:
                    run.recall_s += session.memory.stats.last_recall_s
                    run.tokens_recalled += sum(b - a for a, b in session.memory.stats.last_recalled)
                run.answers.append(Answer(k, q.needle, placed.needle.kind, q.target, q.distance, reply,
                                          exact_match(reply, placed.needle.answer),
                                          kept_share(cached, placed.start, placed.end)))
            session.rollback(state)
            del state
            run.snapshots_done = k + 1
            run.seconds = time.perf_counter() - t_start
            if checkpoint is not None:
                session.save(checkpoint, extra={"run": run.to_json()})
                last_save = run.tokens_streamed
            if progress is not None:
                progress(run, run.tokens_streamed)
        return run


def _feed(session: StreamSession, tokens: np.ndarray, end: int) -> Iterator[int]:
    """Feed the stream from where the session is up to `end`, in pieces; yields the tokens fed so far."""
    done = session.stats.tokens_seen
    while done < end:
        piece = tokens[done:min(done + FEED_PIECE, end)]
        session.feed_tokens(piece.tolist())
        done += piece.size
        yield done


def policies_to_run(policies: Sequence[Policy], n_ctx_train: int, stream_tokens: int) -> list[Policy]:
    """The policies to run, with `full` once, at the largest budget that the model's training context
    allows and the stream needs (its bounded budgets mean nothing to it)."""
    out, full_done = [], False
    for p in policies:
        if not p.evicts:
            if not full_done:
                out.append(p.with_budget(min(n_ctx_train, stream_tokens + 256)))
                full_done = True
        else:
            out.append(p)
    return out
