"""What the memory tier costs, measured side by side with memory off in one process (`infmllm-gguf
bench --only memory`): streaming speed, and the time from a question to its first answer token
with a large memory behind the cache.

The memory's work at a question is its ranking (linear in the tokens it holds) and the re-reading
(at most `reserve` tokens, whatever the memory's size). To price a memory of `memory_tokens`
tokens without streaming them all, the measured session streams `tokens` tokens, then its memory
is given `memory_tokens` more tokens of the same text before the stream (stream indices below 0),
with needles in them; each question asks for one needle, from the same snapshot, once with the
memory and once without it (the prompt fed as it is), interleaved.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..recall.needles import NeedleMaker, exact_match
from ..runtime import Model
from ..session import StreamSession
from ..memory import MemoryConfig, TokenStore
from ..memory.hidden import VECTOR_BYTES, HiddenStates, quantize
from .common import Rate, stream_tokens


@dataclass(frozen=True)
class MemoryCost:
    model: str
    policy: dict
    memory: dict
    tokens: int              # streamed per speed run
    memory_tokens: int       # held by the memory at the questions
    questions: int
    tokens_per_s_off: Rate
    tokens_per_s_on: Rate
    speed_ratio: Rate        # on / off, per repeat
    first_token_s_off: Rate  # question fed, first answer token sampled
    first_token_s_on: Rate
    first_token_ratio: Rate  # on / off, per question
    rank_s: Rate             # the memory's ranking and re-reading, per question (the batch it shares
                             # with the question counted by its re-read tokens' share)
    recalled: Rate           # tokens re-read per question
    correct_off: int
    correct_on: int
    host_bytes_per_token: int

    def table(self) -> str:
        return "\n".join([
            f"memory tier: {self.model}, {self.policy['name']} budget {self.policy['budget']}, ranking "
            f"{self.memory['ranking']}, {self.recalled} tokens re-read per question; medians [min, max]",
            f"  streaming {self.tokens} tokens: {self.tokens_per_s_off} tok/s off, {self.tokens_per_s_on} on "
            f"(on/off {self.speed_ratio})",
            f"  first answer token, {self.memory_tokens:,} tokens in memory, {self.questions} questions: "
            f"{self.first_token_s_off} s off, {self.first_token_s_on} s on (on/off {self.first_token_ratio}); "
            f"ranking + re-reading {self.rank_s} s (a batch shared with the question: by its tokens' share)",
            f"  answers right: {self.correct_off}/{self.questions} off, {self.correct_on}/{self.questions} on; "
            f"host memory {self.host_bytes_per_token} bytes per token "
            f"({self.host_bytes_per_token * self.memory_tokens / 2**20:.1f} MiB here)"])

    def to_json(self) -> dict:
        return asdict(self)


def _give_past_vectors(hidden: HiddenStates, past: np.ndarray, slots: np.ndarray, context: int = 32) -> None:
    """Hidden-state vectors for the past given to the memory: the stream's own, repeated (the
    ranking's cost depends on their number, not their content), and around each needle the
    vectors of its text and `context` tokens either side, decoded in the side context."""
    indices, codes, scales = hidden.store.arrays()
    rows, row_scales = np.resize(codes, (past.size, codes.shape[1])), np.resize(scales, past.size)
    for at in slots:
        a, b = max(at - context, 0), min(at + 64 + context, past.size)
        rows[a:b], row_scales[a:b] = quantize(hidden.embed(past[a:b].tolist()))
    hidden.store.load_state({"vector_indices": np.concatenate((np.arange(-past.size, 0), indices)),
                             "vectors": np.concatenate((rows, codes)),
                             "vector_scales": np.concatenate((row_scales, scales))})


def _stream_speed(model: Model, policy: str, budget: int, tokens: np.ndarray, chunk: int,
                  memory: MemoryConfig | None, n_threads: int | None) -> float:
    with StreamSession(model, policy, budget=budget, chunk=chunk, n_threads=n_threads, memory=memory) as s:
        t0 = time.perf_counter()
        s.feed_tokens(tokens.tolist())
        return tokens.size / (time.perf_counter() - t0)


def memory_cost(model: Model | str | os.PathLike | None = None, *, policy: str = "inf-mllm", budget: int = 512,
                tokens: int = 8192, memory_tokens: int = 200_000, questions: int = 10, chunk: int = 256,
                repeats: int = 3, ranking: str = "hidden", reserve: int = 0, n_threads: int | None = None,
                answer_tokens: int = 8) -> MemoryCost:
    owned = not isinstance(model, Model)
    model = Model(model) if owned else model
    try:
        config = MemoryConfig(ranking=ranking, reserve=reserve)
        text = stream_tokens(model, tokens + memory_tokens, "shakespeare")
        stream, past = text[memory_tokens:], text[:memory_tokens].copy()
        off, on = [], []
        for _ in range(repeats):  # interleaved, so that drift of the machine hits both alike
            off.append(_stream_speed(model, policy, budget, stream, chunk, None, n_threads))
            on.append(_stream_speed(model, policy, budget, stream, chunk, config, n_threads))
        # needles in the memory's past, far from each other
        maker = NeedleMaker(np.random.default_rng(0))
        needles = [maker.make(("number", "word", "fact")[i % 3]) for i in range(questions)]
        slots = np.linspace(0, memory_tokens - 64, questions + 2)[1:-1].astype(int)
        for needle, at in zip(needles, slots):
            ids = model.tokenize(" " + needle.statement, add_special=False)
            past[at:at + len(ids)] = ids
        first = {False: [], True: []}
        rank, recalled, right = [], [], {False: 0, True: 0}
        with StreamSession(model, policy, budget=budget, chunk=chunk, n_threads=n_threads, memory=config) as s:
            s.feed_tokens(stream.tolist())
            ids, indices = s.memory.store.arrays()
            s.memory.store.load_state({"dropped": 0}, {
                "ids": np.concatenate((past, ids)), "indices": np.concatenate((np.arange(-memory_tokens, 0), indices)),
                "copy_indices": np.zeros(0, np.int64), "copy_of": np.zeros(0, np.int64)})
            if s.memory.hidden is not None:
                _give_past_vectors(s.memory.hidden, past, slots)
            state = s.snapshot()
            for needle in needles:
                for with_memory in (False, True):
                    s.rollback(state)
                    t0 = time.perf_counter()
                    if with_memory:
                        s.feed_prompt(needle.prompt())
                    else:
                        s.feed_text(needle.prompt())
                    pieces = s.generate(max_tokens=answer_tokens, temperature=0, stop=("\n",))
                    reply = next(pieces, "")
                    first[with_memory].append(time.perf_counter() - t0)
                    reply += "".join(pieces)
                    right[with_memory] += exact_match(reply, needle.answer)
                    if with_memory:
                        rank.append(s.memory.stats.last_recall_s)
                        recalled.append(sum(b - a for a, b in s.memory.stats.last_recalled))
            s.rollback(state)
        ratio = np.array(first[True]) / np.array(first[False])
        return MemoryCost(model.name, {"name": policy, "budget": budget}, config.config(), tokens, memory_tokens,
                          questions, Rate.of(off), Rate.of(on), Rate.of(np.array(on) / np.array(off)),
                          Rate.of(first[False]), Rate.of(first[True]), Rate.of(ratio), Rate.of(rank),
                          Rate.of(recalled), right[False], right[True],
                          TokenStore.BYTES_PER_TOKEN + (VECTOR_BYTES if ranking == "hidden" else 0))
    finally:
        if owned:
            model.close()
