"""The chat variant: facts told in round 1 of a conversation, asked N rounds later, through the chat path.

Round 1 states `facts` needles in one user message; each later round is a user message carrying a
passage of the filler text and a scripted assistant reply (the next passage), fed through the
model's chat template as `StreamSession.user_turn` / `assistant_turn` (replies are not generated:
300 rounds of sampling would cost more than the benchmark). After each probe round, every fact is
asked from that exact state as a new user turn, the answer's start fed as the assistant's, greedy,
scored by exact match as in the stream variant.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..extras import pyplot
from ..perplexity import NO_MEMORY, text_blocks
from ..memory import memory_label
from ..policies import from_config
from ..runtime import Model
from ..session import SessionConfig, StreamSession
from .needles import VERBATIM_KINDS, Needle, NeedleMaker, exact_match
from .run import ask, run_from_json

PROBE_ROUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 300)
PASSAGE_CHARS = 400


@dataclass
class ChatPlan:
    facts: list[Needle]
    rounds: list[tuple[str, str]]  # (user message, assistant reply) of every round, round 1 first
    probes: tuple[int, ...]        # after these rounds, every fact is asked
    config: dict

    def first_message(self) -> str:
        return self.rounds[0][0]


def passages(path: str | os.PathLike, n: int, offset: int) -> list[str]:
    """`n` passages of about PASSAGE_CHARS characters from the text file, from line `offset` on
    (whole lines, blank lines dropped, wrapping around)."""
    lines = [ln.strip() for block in text_blocks(path) for ln in block.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path} has no text")
    out, i = [], offset % len(lines)
    while len(out) < n:
        piece = []
        while sum(len(p) + 1 for p in piece) < PASSAGE_CHARS:
            piece.append(lines[i])
            i = (i + 1) % len(lines)
        out.append(" ".join(piece))
    return out


def make_chat_plan(filler: str | os.PathLike, *, rounds: int = 300, facts: int = 10,
                   probes: Sequence[int] = PROBE_ROUNDS, kinds: Sequence[str] = VERBATIM_KINDS,
                   seed: int = 0) -> ChatPlan:
    if rounds < 1 or facts < 1:
        raise ValueError(f"need at least one round and one fact (got {rounds}, {facts})")
    probes = tuple(sorted({p for p in probes if 1 <= p <= rounds}))
    if not probes:
        raise ValueError(f"no probe round within the {rounds} rounds")
    rng = np.random.default_rng(seed)
    maker = NeedleMaker(rng)
    told = [maker.make(kinds[i % len(kinds)]) for i in range(facts)]
    # an extra sentence meant before its fact (an update's older value) is told just before it, one
    # meant after (a distractor) in round 2
    first = "Please remember these facts for later.\n" + "\n".join(
        line for n in told for line in [x for x, f in n.extras if f > 1] + [n.statement])
    after = [x for n in told for x, f in n.extras if f <= 1]
    text = passages(filler, 2 * (rounds - 1), offset=int(rng.integers(0, 20_000)))
    later = [(("By the way: " + " ".join(after) + "\n" if i == 0 and after else "")
              + f"Here is a passage:\n{text[2 * i]}\nWhat do you make of it?", text[2 * i + 1])
             for i in range(rounds - 1)]
    config = {"seed": seed, "rounds": rounds, "facts": facts, "kinds": list(kinds), "filler": str(filler)}
    return ChatPlan(told, [(first, "I will remember them.")] + later, probes, config)


@dataclass
class ChatAnswer:
    round: int        # the round after which the fact was asked
    fact: int
    kind: str
    tokens_seen: int  # stream tokens when the fact was asked (round 1 began at 0)
    reply: str
    correct: bool


@dataclass
class ChatRecallRun:
    policy: dict
    chunk: int
    plan: dict
    rounds_done: int = 0
    seconds: float = 0.0
    answers: list[ChatAnswer] = field(default_factory=list)
    memory: dict | None = None  # MemoryConfig.config(); None: off

    def label(self) -> str:
        return from_config(self.policy).label() + memory_label(self.memory)

    def accuracy(self) -> dict[int, tuple[int, int]]:
        """{probe round: (correct, facts asked)}."""
        out: dict[int, tuple[int, int]] = {}
        for a in self.answers:
            right, n = out.get(a.round, (0, 0))
            out[a.round] = (right + a.correct, n + 1)
        return dict(sorted(out.items()))

    def lost_at(self) -> int | None:
        """The first probe round at which fewer than half of the facts were recalled (None: never)."""
        return next((r for r, (right, n) in self.accuracy().items() if 2 * right < n), None)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ChatRecallRun":
        return run_from_json(cls, ChatAnswer, data)


def run_chat_recall(plan: ChatPlan, *, model: Model | str | os.PathLike | None = None,
                    config: SessionConfig = NO_MEMORY, answer_tokens: int = 8,
                    checkpoint: str | os.PathLike | None = None,
                    progress: Callable[[ChatRecallRun], None] | None = None) -> ChatRecallRun:
    """Play the conversation through a session made as `config` says, asking every fact after each
    probe round; `checkpoint` as in `run_recall` (saved after every probe). With a memory
    (`config.memory`, off by default), every user turn (each round's and each question's)
    re-reads what it ranks best."""
    with StreamSession.from_config(model, config) as session:
        session.chat_template()  # a model without one fails here
        run = ChatRecallRun(policy=session.policy.config(), chunk=config.chunk, plan=plan.config,
                            memory=None if session.memory is None else session.memory.config.config())
        if checkpoint is not None and Path(checkpoint).exists():
            saved = ChatRecallRun.from_json(session.load(checkpoint)["run"])
            if saved.plan != plan.config:
                raise ValueError(f"{checkpoint} holds a run of another chat plan; remove it or use another "
                                 "--checkpoint-dir")
            run = saved
        t_start = time.perf_counter() - run.seconds
        for r in range(run.rounds_done + 1, max(plan.probes) + 1):
            user, assistant = plan.rounds[r - 1]
            session.user_turn(user)
            session.assistant_turn(assistant)
            run.rounds_done = r
            run.seconds = time.perf_counter() - t_start
            if r in plan.probes:
                state, seen = session.snapshot(), session.stats.tokens_seen
                for i, fact in enumerate(plan.facts):
                    if i:
                        session.rollback(state)
                    session.user_turn(fact.question)
                    reply = ask(session, fact.answer_prefix, answer_tokens, recall=False)  # the user turn recalled
                    run.answers.append(ChatAnswer(r, i, fact.kind, seen, reply,
                                                  exact_match(reply, fact.answer)))
                session.rollback(state)
                del state
                if checkpoint is not None:
                    session.save(checkpoint, extra={"run": run.to_json()})
            if progress is not None:
                progress(run)
        return run


def plot_chat(runs: Sequence[ChatRecallRun], path: str | os.PathLike, title: str = "") -> None:
    """Share of round-1 facts recalled against the rounds since, one line per run."""
    plt = pyplot("a chat recall plot (--png)")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        acc = r.accuracy()
        lost = r.lost_at()
        ax.plot(list(acc), [right / n for right, n in acc.values()], marker="o",
                label=f"{r.label()} (lost at round {lost})" if lost else f"{r.label()} (kept)")
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("round after which the facts were asked (told in round 1)")
    ax.set_ylabel("facts recalled (exact match)")
    ax.set_title(title or "chat: recall of round-1 facts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
