"""Generation speed with llama.cpp's sampler chain (`runtime.ChainSampler`, what `generate` uses)
against NumPy's `make_sampler` (the server's and `Llama`'s), interleaved in one session, and what
a grammar (a JSON schema) costs. Also each sampler alone on fixed logits (ms per token).

    .venv/bin/python scripts/sampler_speed.py [--model PATH] [--repeats 3] [--tokens 128]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from infmllm_gguf import StreamSession
from infmllm_gguf.generation import make_sampler
from infmllm_gguf.runtime import ChainSampler, SamplerOptions

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "lines": {"type": "array",
                                                                                   "items": {"type": "string"}}},
          "required": ["title", "lines"]}


class NoEnd:
    """A sampler with the end-of-generation tokens forbidden, so that every reply is `--tokens` long;
    the same wrapper (a copy of the logits) around each sampler compared."""

    def __init__(self, sampler, ends: np.ndarray):
        self.sampler, self.ends = sampler, ends

    def __call__(self, logits: np.ndarray) -> int:
        logits = logits.copy()
        logits[self.ends] = -np.inf
        return self.sampler(logits)

    def reset(self) -> None:
        getattr(self.sampler, "reset", lambda: None)()


def run(session: StreamSession, n_tokens: int, **how) -> tuple[float, int]:
    """tokens/s of one reply (the prompt fed first, not timed) and its length."""
    session.reset()
    session.feed_text(PROMPT)
    t0 = time.perf_counter()
    for _ in session.generate(max_tokens=n_tokens, **how):
        pass
    n = session.last_reply.n_tokens
    return n / (time.perf_counter() - t0), n


def per_call_ms(sampler, rows: np.ndarray) -> float:
    t0 = time.perf_counter()
    for row in rows:
        sampler(row)
    return (time.perf_counter() - t0) / len(rows) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp's threads (default: its own)")
    a = ap.parse_args()
    with StreamSession(a.model, budget=512, chunk=64, memory=False, n_threads=a.threads) as s:
        print(f"model {s.model.name}, vocab {s.model.n_vocab}, {a.tokens} tokens a reply, {a.repeats} repeats, "
              f"threads {a.threads or 'default'}")
        ends = np.flatnonzero([s.model.is_end_of_generation(t) for t in range(s.model.n_vocab)])

        def chain(**options):
            return {"sampler": NoEnd(ChainSampler(s.model, SamplerOptions(**options)), ends)}
        ways = {  # end-of-generation forbidden but with a grammar, whose replies end when it is complete
            "python make_sampler (t 0.7, top-p 0.95)": lambda i: {"sampler": NoEnd(make_sampler(
                0.7, 0.95, np.random.default_rng(i)), ends)},
            "chain (t 0.7, top-p 0.95)": lambda i: chain(temperature=0.7, top_p=0.95, seed=i),
            "chain + repeat penalty 1.1 + top-k 40": lambda i: chain(temperature=0.7, top_p=0.95, top_k=40,
                                                                     repeat_penalty=1.1, seed=i),
            "python make_sampler greedy": lambda i: {"sampler": NoEnd(make_sampler(0, 1, np.random.default_rng(i)),
                                                                      ends)},
            "chain greedy": lambda i: chain(temperature=0),
            "chain + JSON schema (ends with it)": lambda i: {"temperature": 0.7, "top_p": 0.95, "seed": i,
                                                             "json_schema": SCHEMA},
            "chain (t 0.7, top-p 0.95) ends freely": lambda i: {"temperature": 0.7, "top_p": 0.95, "seed": i},
        }
        figures: dict[str, list[float]] = {k: [] for k in ways}
        lengths: dict[str, list[int]] = {k: [] for k in ways}
        run(s, 16, temperature=0)  # warm up
        for i in range(a.repeats):
            for name, how in ways.items():  # interleaved: each repeat runs every way once
                tps, n = run(s, a.tokens, **how(i))
                figures[name].append(tps)
                lengths[name].append(n)
        print("\ngeneration (decode + sample), tokens/s: median [min, max] over repeats; reply lengths")
        for name in ways:
            f = figures[name]
            print(f"  {name:42s} {statistics.median(f):7.1f}  [{min(f):6.1f}, {max(f):6.1f}]  {lengths[name]}")

        rng = np.random.default_rng(0)
        rows = (rng.normal(size=(200, s.model.n_vocab)) * 3).astype(np.float32)
        print("\nsampling alone on random logits, ms per token (median of 3)")
        alone = {
            "python make_sampler (t 0.7, top-p 0.95)": lambda: make_sampler(0.7, 0.95, np.random.default_rng(0)),
            "chain (t 0.7, top-p 0.95)": lambda: ChainSampler(s.model, SamplerOptions(seed=0)),
            "chain greedy": lambda: ChainSampler(s.model, SamplerOptions(temperature=0)),
        }
        for name, make in alone.items():
            print(f"  {name:42s} {statistics.median(per_call_ms(make(), rows) for _ in range(3)):7.3f}")
        # a grammar's cost where the chain's first draw is refused: the grammar masks the whole vocabulary
        with ChainSampler(s.model, SamplerOptions(temperature=0, grammar='root ::= [0-9]+')) as digits:
            print(f"  {'chain greedy + grammar, draw refused':42s} {statistics.median(per_call_ms(digits, rows[:20]) for _ in range(3)):7.3f}")


if __name__ == "__main__":
    main()
