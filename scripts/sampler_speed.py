"""Generation speed with llama.cpp's sampler chain (`runtime.ChainSampler`, what `generate` uses)
against `make_sampler` (NumPy's, in Python: what the server and `Llama` sampled with before issue 36,
kept here as the baseline), interleaved in one session, and what
a grammar (a JSON schema) costs. Also each sampler alone on fixed logits (ms per token).

    .venv/bin/python scripts/sampler_speed.py [--model PATH] [--repeats 3] [--tokens 128]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from infmllm_gguf import StreamSession
from infmllm_gguf.generation import Sampler, log_softmax
from infmllm_gguf.runtime import ChainSampler, SamplerOptions

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "lines": {"type": "array",
                                                                                   "items": {"type": "string"}}},
          "required": ["title", "lines"]}


def make_sampler(temperature: float, top_p: float, rng: np.random.Generator, *, top_k: int = 0,
                 min_p: float = 0.0) -> Sampler:
    """Greedy at temperature 0; else, at `temperature`, the `top_k` likeliest tokens (0: all), of
    those the ones at least `min_p` times as likely as the likeliest, and of those the smallest set
    whose probability reaches `top_p` (nucleus sampling), drawn from `rng`: the baseline."""
    if temperature < 0 or not 0 <= top_p <= 1 or top_k < 0 or not 0 <= min_p <= 1:
        raise ValueError(f"need temperature >= 0, top_p and min_p in [0, 1] and top_k >= 0 (got {temperature}, "
                         f"{top_p}, {min_p}, {top_k})")
    if temperature == 0:
        return lambda logits: int(np.argmax(logits))

    def sample(logits: np.ndarray) -> int:
        # shifted to a peak of 0 first, in float64: a tiny temperature then sends the others to
        # -inf (probability 0) instead of overflowing the peak to inf (inf - inf: NaN)
        shifted = logits.astype(np.float64) - np.max(logits)
        p = np.exp(log_softmax(shifted / temperature))
        order = np.argsort(-p)
        if top_k:
            order = order[:top_k]
        if min_p:
            order = order[p[order] >= min_p * p[order[0]]]
        kept = p[order] / p[order].sum() if top_k or min_p else p[order]
        cut = int(np.searchsorted(np.cumsum(kept), top_p)) + 1
        top = order[:cut]
        return int(rng.choice(top, p=p[top] / p[top].sum()))
    return sample


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
