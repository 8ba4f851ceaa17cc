"""Sampling with llama.cpp's own samplers: `SamplerOptions` (every option and its default, declared
once) and `ChainSampler`, a `llama_sampler` chain that picks the next token from a row of logits.

The chain works on the logits it is given (a `llama_token_data_array` built over them), not on an
output index of a llama.cpp context, so that it does not depend on which output holds them; it
`accept`s each token it picks (the penalties' window and the grammar follow the reply, not the KV
cache, so an eviction mid-answer changes neither). The chain, as llama.cpp's `common_sampler` builds
it: logit bias, penalties, then top-k, typical-p, top-p, min-p, temperature and a seeded draw (at
temperature 0, the likeliest token); with Mirostat: logit bias, penalties, temperature and Mirostat's
own draw (llama.cpp's chain leaves the penalties out there, llama-cpp-python's keeps them, as here).
A grammar (GBNF, or one made from a JSON schema by llama-cpp-python's converter) is applied as
`common_sampler_sample` applies it: the chain's token is kept if the grammar allows it, else the
grammar masks the whole vocabulary and the chain draws again (or, `grammar_first`, as
llama-cpp-python applies it: the grammar masks the vocabulary before every draw); once the grammar is
complete it allows only an end-of-generation token.
"""
from __future__ import annotations

import ctypes
import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np
from llama_cpp import llama_cpp as llama
from llama_cpp.llama_grammar import LlamaGrammar

from .closing import Closing
from .log import LOG

if TYPE_CHECKING:
    from .model import Model

__all__ = ["ChainSampler", "SamplerOptions", "grammar_text", "json_schema_grammar"]

_MAX_SEED = 2**32 - 2  # llama.cpp's LLAMA_DEFAULT_SEED (2**32 - 1) asks it for a random seed
#: below this temperature the draw is greedy: it would be anyway (another token's odds are
#: exp(-1e4) or less at a logit gap of 0.01), and llama.cpp's division overflows float logits to
#: inf near 1e-38, its softmax then NaN and its draw arbitrary
GREEDY_BELOW = 1e-6
_MIROSTAT_M = 100  # the tokens Mirostat 1.0 estimates its Zipf exponent from: llama.cpp's and the paper's

# llama_token_data {llama_token id; float logit; float p;}: 12 bytes, no padding
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama.llama_token_data)


@dataclass(frozen=True)
class SamplerOptions:
    """How the next token is chosen; the defaults of every entry point (`StreamSession.generate`,
    `chat`, `chat_stream`).

    `temperature` 0.7: 0 (or below 1e-6) picks the likeliest token (greedy); `top_k` 0: the k likeliest tokens (0:
    all); `top_p` 0.95: the smallest set whose probability reaches p (1: all); `min_p` 0.0: tokens at
    least p times as likely as the likeliest (0: all); `typical_p` 1.0: locally typical sampling
    (1: off); `repeat_penalty` 1.0 (1: off), `frequency_penalty` 0.0 and `presence_penalty` 0.0, over
    the last `penalty_last_n` 64 tokens of the reply (0: off): a token seen n times in that window has
    its logit divided by `repeat_penalty` (multiplied, if negative), then lowered by
    n * `frequency_penalty` + `presence_penalty`, as llama.cpp does; `mirostat` 0: 1 or 2 draws with
    Mirostat 1.0 or 2.0 (arXiv:2007.14966) aiming at a surprise of `mirostat_tau` 5.0 bits a token,
    learning at `mirostat_eta` 0.1, in place of top-k, typical-p, top-p, min-p and the plain draw
    (0: off); `logit_bias` {}: token id ->
    number added to its logit (-inf forbids it); `seed` None: the draw's seed (0 .. 2**32 - 2; None:
    the session's generator gives one); `grammar` None: a GBNF grammar (root rule `root`) the reply
    must follow; `json_schema` None: a JSON schema (a dict or its text) the reply must follow, as a
    grammar; `grammar_first` False: the chain draws from the whole vocabulary and the grammar checks
    its token (llama.cpp's `common_sampler`: faster, and leaning towards what the model would say
    unconstrained), True: the grammar masks the vocabulary before the chain at every step
    (llama-cpp-python's: a draw from the tokens the grammar allows); `grammar_triggers` (): words
    that start the grammar (a lazy grammar, as llama-server's for tool calls): the reply is free
    until it writes one of them, and from that word on it follows the grammar, whose root matches
    from the word (empty: the grammar holds from the first token). top-k, typical-p, top-p and
    min-p read the logits before the temperature divides them, as in llama.cpp."""
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.95
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    grammar: str | None = None
    json_schema: Mapping[str, Any] | str | None = None
    grammar_first: bool = False
    grammar_triggers: tuple[str, ...] = ()

    MAX_SEED: ClassVar[int] = _MAX_SEED

    def __post_init__(self) -> None:
        bad = []
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad.append(f"temperature >= 0 (got {self.temperature})")
        if self.top_k < 0:
            bad.append(f"top_k >= 0 (got {self.top_k})")
        for name in ("top_p", "min_p", "typical_p"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                bad.append(f"{name} in [0, 1] (got {value})")
        if not (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0):
            bad.append(f"repeat_penalty > 0 (got {self.repeat_penalty})")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                bad.append(f"a finite {name} (got {getattr(self, name)})")
        if self.penalty_last_n < 0:
            bad.append(f"penalty_last_n >= 0 (got {self.penalty_last_n})")
        if self.mirostat not in (0, 1, 2):
            bad.append(f"mirostat 0, 1 or 2 (got {self.mirostat})")
        for name in ("mirostat_tau", "mirostat_eta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                bad.append(f"{name} >= 0 (got {value})")
        if self.seed is not None and not 0 <= self.seed <= _MAX_SEED:
            bad.append(f"seed in [0, {_MAX_SEED}] (got {self.seed})")
        for token, bias in dict(self.logit_bias).items():
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
                bad.append(f"logit_bias keys that are token ids (got {token!r})")
            elif math.isnan(bias) or bias == math.inf:
                bad.append(f"a logit_bias that is a number or -inf (got {bias} for token {token})")
        if self.grammar is not None and self.json_schema is not None:
            bad.append("a grammar or a json_schema, not both")
        if self.grammar is not None and not self.grammar.strip():
            bad.append("a grammar that is not empty")
        if self.grammar_triggers and (self.grammar is None and self.json_schema is None or not all(self.grammar_triggers)):
            bad.append("grammar_triggers with a grammar or a json_schema, each a non-empty word")
        if bad:
            raise ValueError("sampling needs " + "; ".join(bad))

    @property
    def penalized(self) -> bool:
        return self.penalty_last_n > 0 and (self.repeat_penalty != 1 or self.frequency_penalty != 0
                                            or self.presence_penalty != 0)

    def gbnf(self) -> str | None:
        """The grammar the reply must follow (the JSON schema's, converted), None if none."""
        return json_schema_grammar(self.json_schema) if self.json_schema is not None else self.grammar


def grammar_text(grammar: str | LlamaGrammar) -> str:
    """The GBNF text of a grammar given as text or as llama-cpp-python's `LlamaGrammar` (which holds
    its text, root rule `root`); ValueError for anything else."""
    if isinstance(grammar, str):
        return grammar
    if isinstance(grammar, LlamaGrammar):
        return grammar._grammar  # its only record of the text; from_string, from_file and from_json_schema set it
    raise ValueError(f"a grammar is GBNF text or a llama_cpp.LlamaGrammar (got {type(grammar).__name__})")


#: the most repetitions a schema may ask in all: without a bound, a few bytes such as
#: `"pattern": "^a{100000000}$"` make the converter build a grammar of gigabytes
MAX_SCHEMA_REPEATS = 10_000
_REPEAT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems")
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")
#: the rule of a string's character in the converter's grammars, which lets through control
#: characters that a JSON string cannot hold (a raw newline: a reply json.loads refuses), and the
#: same without them, as llama.cpp's converter and JSON grammar write it
_LOOSE_CHAR, _JSON_CHAR = r' ::= [^"\\] | ', r' ::= [^"\\\x7F\x00-\x1F] | '


def schema_repeats(schema: object) -> float:
    """The repetitions a JSON schema asks in all: its counts (minLength, maxLength, minItems,
    maxItems) and its patterns' quantifiers ({n}, {n,m}); walked without recursion (a request's
    schema nests as deep as its parser allows)."""
    total, todo = 0.0, [schema]
    while todo:
        node = todo.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if key in _REPEAT_KEYWORDS and isinstance(value, (int, float)) and not isinstance(value, bool):
                total += max(value, 0)
            elif key == "pattern" and isinstance(value, str):
                total += sum(float(n or 0) + float(m or 0) for n, m in _QUANTIFIER.findall(value))  # "{2,}": 2
            else:
                todo.append(value)
    return total


def json_schema_grammar(schema: Mapping[str, Any] | str) -> str:
    """A JSON schema (a dict or its text) as a GBNF grammar, by llama-cpp-python's converter, its
    strings without control characters; ValueError if the schema is not one it can convert, or if
    it asks more than `MAX_SCHEMA_REPEATS` repetitions."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        parsed = json.loads(schema) if isinstance(schema, str) else schema
    except ValueError as exc:
        raise ValueError(f"invalid JSON schema (not JSON: {exc})") from None
    if schema_repeats(parsed) > MAX_SCHEMA_REPEATS:
        raise ValueError(f"the JSON schema asks more than {MAX_SCHEMA_REPEATS} repetitions in all (minLength, "
                         "maxLength, minItems, maxItems, a pattern's {n,m}): no grammar that large is made")
    try:
        return json_schema_to_gbnf(json.dumps(parsed)).replace(_LOOSE_CHAR, _JSON_CHAR)
    except Exception as exc:  # the converter raises whatever its code meets: KeyError, TypeError, ...
        raise ValueError(f"invalid JSON schema ({type(exc).__name__}: {exc})") from None


class ChainSampler(Closing):
    """llama.cpp's sampler chain over `model`'s vocabulary, made as `options` say: a `Sampler`
    (logits float32 [n_vocab] -> token id) that accepts the token it picks. `reset()` forgets the
    reply (the penalties' window, the grammar's progress) and restarts the draw from its seed: call
    it before each generation. `close()` frees the chain (also when collected)."""

    def __init__(self, model: Model, options: SamplerOptions = SamplerOptions(), *, seed: int = 0):
        self.model, self.options = model, options  # the model outlives the grammar's vocabulary pointer
        self.n_vocab = model.n_vocab
        self.chain = self.grammar = None
        for token in options.logit_bias:
            if token >= self.n_vocab:
                raise ValueError(f"logit_bias names token {token}, beyond the vocabulary of {self.n_vocab}")
        gbnf = options.gbnf()
        if gbnf is not None:
            LOG.pop_errors()
            self.grammar = self._grammar_sampler(model, gbnf, options.grammar_triggers)
            if not self.grammar:
                self.grammar = None
                raise ValueError(f"invalid grammar: {LOG.pop_errors() or 'llama.cpp could not parse it'}")
        params = llama.llama_sampler_chain_default_params()
        params.no_perf = True
        self.chain = llama.llama_sampler_chain_init(params)
        for sampler in self._samplers(options, options.seed if options.seed is not None else seed):
            llama.llama_sampler_chain_add(self.chain, sampler)  # the chain owns it now
        self._tokens = np.zeros(self.n_vocab, _TOKEN_DATA)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._data = self._tokens.ctypes.data_as(llama.llama_token_data_p)
        self._array = llama.llama_token_data_array(self._data, self.n_vocab, -1, False)
        self._one = llama.llama_token_data(0, 1.0, 0.0)
        self._one_array = llama.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)

    @staticmethod
    def _grammar_sampler(model: Model, gbnf: str, triggers: tuple[str, ...]):
        if not triggers:
            return llama.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
        # llama-server's pattern for trigger words anywhere: the grammar is fed from the first group
        pattern = "^[\\s\\S]*?(" + "|".join(re.escape(t) for t in triggers) + ")[\\s\\S]*"
        patterns = (ctypes.c_char_p * 1)(pattern.encode())
        return llama.llama_sampler_init_grammar_lazy_patterns(model.vocab, gbnf.encode(), b"root", patterns, 1, None, 0)

    def _samplers(self, o: SamplerOptions, seed: int) -> list:
        if not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"seed must be in [0, {_MAX_SEED}] (got {seed})")
        out = []
        if o.logit_bias:
            bias = (llama.llama_logit_bias * len(o.logit_bias))(
                *[llama.llama_logit_bias(int(t), float(b)) for t, b in o.logit_bias.items()])
            out.append(llama.llama_sampler_init_logit_bias(self.n_vocab, len(o.logit_bias), bias))  # copied
        if o.penalized:
            out.append(llama.llama_sampler_init_penalties(self.n_vocab, o.penalty_last_n, o.repeat_penalty,
                                                          o.frequency_penalty, o.presence_penalty))
        if o.temperature < GREEDY_BELOW:
            return out + [llama.llama_sampler_init_greedy()]
        if o.mirostat == 1:
            return out + [llama.llama_sampler_init_temp(o.temperature),
                          llama.llama_sampler_init_mirostat(self.n_vocab, seed, o.mirostat_tau, o.mirostat_eta,
                                                            _MIROSTAT_M)]
        if o.mirostat == 2:
            return out + [llama.llama_sampler_init_temp(o.temperature),
                          llama.llama_sampler_init_mirostat_v2(seed, o.mirostat_tau, o.mirostat_eta)]
        if o.top_k > 0:
            out.append(llama.llama_sampler_init_top_k(o.top_k))
        if o.typical_p < 1:
            out.append(llama.llama_sampler_init_typical(o.typical_p, 1))
        if o.top_p < 1:
            out.append(llama.llama_sampler_init_top_p(o.top_p, 1))
        if o.min_p > 0:
            out.append(llama.llama_sampler_init_min_p(o.min_p, 1))
        return out + [llama.llama_sampler_init_temp(o.temperature), llama.llama_sampler_init_dist(seed)]

    def _fill(self, logits: np.ndarray) -> None:
        if logits.shape != (self.n_vocab,):
            raise ValueError(f"need logits of shape ({self.n_vocab},), got {logits.shape}")
        self._tokens["id"] = self._ids
        self._tokens["logit"] = logits
        self._tokens["p"] = 0.0
        a = self._array
        a.data, a.size, a.selected, a.sorted = self._data, self.n_vocab, -1, False  # a sampler may move them

    def _selected(self) -> llama.llama_token_data:
        a = self._array
        if not 0 <= a.selected < a.size:
            raise RuntimeError(f"llama.cpp's sampler chain selected no token (index {a.selected} of {a.size})")
        return a.data[a.selected]

    def _allowed(self, token: int) -> bool:
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        llama.llama_sampler_apply(self.grammar, ctypes.byref(self._one_array))
        return self._one.logit != -math.inf

    def __call__(self, logits: np.ndarray) -> int:
        if self.chain is None:
            raise ValueError("the sampler is closed")
        masked = self.grammar is not None and self.options.grammar_first
        chosen = self._draw(logits, masked)
        if self.grammar is not None and not masked and not self._allowed(int(chosen.id)):
            chosen, masked = self._draw(logits, True), True  # the grammar masks the vocabulary, the chain draws again
        token = int(chosen.id)
        if masked and (chosen.logit == -math.inf or not self._allowed(token)):  # accepting it would abort llama.cpp
            raise ValueError("the grammar allows no token that the sampling options leave (a logit_bias "
                             "of -inf on every allowed token?)")
        if self.grammar is not None:
            llama.llama_sampler_accept(self.grammar, token)
        llama.llama_sampler_accept(self.chain, token)
        return token

    def _draw(self, logits: np.ndarray, masked: bool) -> llama.llama_token_data:
        """The chain's choice from `logits`, the vocabulary first `masked` by the grammar."""
        self._fill(logits)
        if masked:
            llama.llama_sampler_apply(self.grammar, ctypes.byref(self._array))
        llama.llama_sampler_apply(self.chain, ctypes.byref(self._array))
        return self._selected()

    def reset(self) -> None:
        """Back to a new reply: no tokens in the penalties' window, the grammar at its start, the draw
        at its seed."""
        llama.llama_sampler_reset(self.chain)
        if self.grammar is not None:
            llama.llama_sampler_reset(self.grammar)

    def close(self) -> None:
        for name in ("chain", "grammar"):
            ptr = getattr(self, name, None)
            if ptr:
                llama.llama_sampler_free(ptr)
            setattr(self, name, None)

