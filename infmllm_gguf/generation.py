"""Generation in layers, as mlx-lm's `generate_step` and `stream_generate`: `generate_tokens`
samples token ids through the cache controller with any sampler callable (llama.cpp's chain,
`runtime.ChainSampler`, everywhere); `StreamingDetokenizer`
turns token ids into text, holding back a character whose bytes are split across tokens;
`text_pieces` adds stop strings on top; `Piece` is what `StreamSession.generate` yields, with
each token's log-probability when asked (`LogprobSampler`)."""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from .runtime.sampler import SamplerOptions

if TYPE_CHECKING:
    from .controller import CacheController

#: a sampler takes the next-token logits (float32 [n_vocab]) and returns a token id; one with a
#: `reset()` method (`ChainSampler`) is reset when a generation starts
Sampler = Callable[[np.ndarray], int]


@dataclass(frozen=True)
class Sampling:
    """The sampling defaults of every entry point (`StreamSession.generate`, `chat`, `chat_stream`,
    the `chat` command, `serve`): the reply's length here, the sampler's options in
    `runtime.SamplerOptions` (temperature and top-p repeated here for the entry points that take
    only those)."""
    max_tokens: int = 256
    temperature: float = SamplerOptions.temperature
    top_p: float = SamplerOptions.top_p


DEFAULTS = Sampling()


class Piece(str):
    """A piece of generated text: a `str` (joined, the pieces are the reply) that also carries what
    mlx-lm's `GenerationResponse` does. `token`: the id of the token that completed the piece;
    `finish_reason`: None but on the last piece, which has no text ("stop": an end-of-generation
    token or a stop string; "length": `max_tokens`); `prompt_tokens` and `prompt_tps`: the prompt
    fed before the reply; `generation_tokens` and `generation_tps`: the reply's tokens so far;
    `logprobs`: None unless asked for, else a `TokenLogprob` for each token sampled since the
    previous piece (a token's text may come in a later piece, held back at a split character or a
    possible stop string); the last piece's are those of tokens whose text is not in the reply
    (a stop string's), so that the other pieces' joined are the reply's."""

    token: int | None
    finish_reason: str | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    logprobs: tuple[TokenLogprob, ...] | None

    def __new__(cls, text: str, *, token: int | None, finish_reason: str | None, prompt_tokens: int,
                prompt_tps: float, generation_tokens: int, generation_tps: float,
                logprobs: tuple[TokenLogprob, ...] | None = None) -> "Piece":
        piece = super().__new__(cls, text)
        piece.__dict__.update(token=token, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                              prompt_tps=prompt_tps, generation_tokens=generation_tokens,
                              generation_tps=generation_tps, logprobs=logprobs)
        return piece

    @property
    def text(self) -> str:
        return str(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll_of(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row (float64). Only the log-sum-exp is
    computed, in float32 with a float64 sum: the whole log-softmax would dominate a long stream."""
    peak = logits.max(axis=-1)
    lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1, dtype=np.float64))
    return lse - logits[np.arange(len(targets)), targets].astype(np.float64)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (its raw logits: before temperature,
    top-p or any other sampling step) and the `top` likeliest tokens' (id, log-probability), best first."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class LogprobSampler:
    """A sampler that also notes, for each token it picks, its `TokenLogprob` with the `n_top`
    likeliest alternatives (`last`: the latest)."""

    def __init__(self, sample: Sampler, n_top: int):
        if n_top < 0:
            raise ValueError(f"need logprobs >= 0 alternatives (got {n_top})")
        self.sample, self.n_top = sample, n_top
        self.last: TokenLogprob | None = None

    def __call__(self, logits: np.ndarray) -> int:
        token = self.sample(logits)
        logp = log_softmax(logits)
        best = np.argsort(-logp, kind="stable")[:self.n_top]
        self.last = TokenLogprob(token, float(logp[token]), tuple((int(t), float(logp[t])) for t in best))
        return token

    def reset(self) -> None:
        reset_sampler(self.sample)


def reset_sampler(sampler: Sampler) -> None:
    """Reset a stateful sampler (one with a `reset()` method) for a new generation."""
    reset = getattr(sampler, "reset", None)
    if callable(reset):
        reset()


@dataclass
class Reply:
    """How a generation went: the tokens sampled (an end-of-generation token not counted, nor
    decoded) and why it ended: "stop" (an end-of-generation token or a stop string) or "length"
    (`max_tokens`), as OpenAI's API names them."""
    n_tokens: int = 0
    finish_reason: str = "stop"


def generate_tokens(cache: CacheController, sampler: Sampler, *, max_tokens: int,
                    is_end: Callable[[int], bool], reply: Reply | None = None) -> Iterator[int]:
    """Sample up to `max_tokens` token ids after what the cache holds, each decoded into the cache
    (evicting as it goes) before it is yielded, so that a caller who stops reading leaves a
    consistent stream. Stops before a token that `is_end`. `reply` counts the tokens and says why
    the generation ended (left at "stop" if the caller stops reading first, at a stop string).
    A stateful `sampler` is reset first: its state (penalties, grammar) follows the tokens it
    sampled, never the cache, which may evict them."""
    if cache.n_cached == 0:
        raise ValueError("nothing to continue: feed text or pass a prompt first")
    reply = reply if reply is not None else Reply()
    reset_sampler(sampler)
    logits = cache.runtime.logits()
    for _ in range(max_tokens):
        token = sampler(logits)
        if is_end(token):
            return
        cache.decode([token], generating=True)
        reply.n_tokens += 1
        yield token
        logits = cache.runtime.logits()
    reply.finish_reason = "length"


class StreamingDetokenizer:
    """Token ids to text, one token at a time: the bytes of a character split across tokens are
    held back until it is complete (decoding each token alone would give U+FFFD). A character left
    incomplete when generation stops is never emitted, as llama-cpp-python drops it; bytes that
    cannot be UTF-8 at all become U+FFFD."""

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self.token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """The text completed by `token` (possibly empty)."""
        return self._decoder.decode(self.token_bytes(token))


def text_pieces(tokens: Iterable[int], detokenizer: StreamingDetokenizer, stop: Sequence[str] = ()) -> Iterator[str]:
    """The text of `tokens` in pieces, ending before the first `stop` string (not yielded). Text
    that could still become a stop string is held back until it cannot."""
    hold = max((len(s) - 1 for s in stop), default=0)
    text, emitted = "", 0

    def stop_at(searched_from: int) -> int:
        return min((i for i in (text.find(s, searched_from) for s in stop) if i >= 0), default=-1)

    for token in tokens:
        before = len(text)
        text += detokenizer.add(token)
        hit = stop_at(max(0, before - hold))
        if hit >= 0:
            if hit > emitted:
                yield text[emitted:hit]
            return
        if len(text) - hold > emitted:
            yield text[emitted:len(text) - hold]
            emitted = len(text) - hold
    if len(text) > emitted:
        yield text[emitted:]


def reply_pieces(cache: CacheController, sampler: Sampler, *, max_tokens: int, stop: Sequence[str],
                 is_end: Callable[[int], bool], token_bytes: Callable[[int], bytes], reply: Reply, n_prompt: int,
                 prompt_tps: float, noting: LogprobSampler | None = None) -> Iterator[Piece]:
    """`generate_tokens` as text `Piece`s with their counts and speeds (and, with `noting`, the
    log-probabilities of their tokens); the last piece is empty and carries the finish reason.
    The cache is brought back to its budget when the generation ends, however it ends."""
    last: list[int | None] = [None]
    noted: list[TokenLogprob] = []

    def tokens_seen() -> Iterator[int]:
        for token in tokens:
            last[0] = token
            if noting is not None:  # the end-of-generation token, sampled but never yielded, is left out
                noted.append(noting.last)
            yield token

    def piece(text: str, finish_reason: str | None) -> Piece:
        logprobs = None if noting is None else tuple(noted)
        noted.clear()
        return Piece(text, token=last[0], finish_reason=finish_reason, prompt_tokens=n_prompt,
                     prompt_tps=prompt_tps, generation_tokens=reply.n_tokens,
                     generation_tps=reply.n_tokens / max(time.perf_counter() - t0, 1e-9), logprobs=logprobs)
    t0 = time.perf_counter()
    tokens = generate_tokens(cache, noting or sampler, max_tokens=max_tokens, is_end=is_end, reply=reply)
    try:
        for text in text_pieces(tokens_seen(), StreamingDetokenizer(token_bytes), stop):
            yield piece(text, None)
    finally:
        tokens.close()
        if cache.n_cached > cache.policy.budget:
            cache.evict()
    yield piece("", reply.finish_reason)
