"""`Llama`: llama-cpp-python's class of the same name, over a bounded `StreamSession`, so that code
written for llama-cpp-python switches by changing one import and never runs out of context.

    from infmllm_gguf import Llama        # was: from llama_cpp import Llama
    llm = Llama(model_path="model.gguf", n_ctx=2048)
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hello"}])

The constructor, `create_completion` (and `__call__`), `create_chat_completion`, `embed`,
`create_embedding`, `tokenize`, `detokenize`, `reset`, `set_seed`, `save_state`, `load_state`,
`n_ctx`, `n_embd`, `n_vocab`, `token_bos`, `token_eos` and `pooling_type` take llama-cpp-python's
arguments and return its dicts and stream chunks. `n_ctx` becomes the cache's budget: where
llama-cpp-python raises "Requested tokens (N) exceed context window of M", this one evicts with
the policy (`policy=`, default inf-mllm) and keeps what it evicts in its memory (`memory=`, on by
default). Chats are rendered as llama-cpp-python renders them: the GGUF's Jinja template through
its formatter (llama.cpp's own engine, which the rest of this package uses as llama-server does
without --jinja, leaves out what some templates add, such as SmolLM2's default system message).
Like llama-cpp-python, a prompt that extends the previous prompt and reply (a chat resent with its
history) reads only its new part; any other starts the stream again.

Sampling is llama.cpp's sampler chain (`runtime.ChainSampler`), with llama-cpp-python's options:
temperature, top_k (0 or less: all), top_p, min_p, typical_p, repeat_penalty, frequency_penalty
and presence_penalty (over the reply's last `last_n_tokens_size` tokens), mirostat_mode with
mirostat_tau and mirostat_eta, logit_bias, grammar (a `llama_cpp.LlamaGrammar` or GBNF text), chat's
response_format (text, json_object, json_schema), seed, logits_processor and stopping_criteria
(`Processors`: their `input_ids` are the request's prompt and the reply so far, as llama-cpp-python
holds them, not the bounded stream), and `logprobs` (completions) or `logprobs` with
`top_logprobs` (chat) in its format. The chain is built as llama-cpp-python builds it (a grammar
masks the vocabulary before each draw) and seeded as it seeds it (a request without a seed takes
`random.Random(last seed).randint(0, 2**32)`; `set_seed` sets the last seed, `save_state` saves
it), so that given the same logits a sampled reply is llama-cpp-python's (but with Mirostat at a
temperature other than 1: it divides the logits first, as llama.cpp's own chain does, where
llama-cpp-python leaves the temperature out). `echo` returns the prompt before the reply (streamed:
as the first chunk, where llama-cpp-python leaves it out).

Refused with ValueError when set to anything but their defaults, never ignored: `tfs_z` (llama.cpp
has no tail-free sampling any more; llama-cpp-python 0.3.36 ignores it), `suffix`, `echo` with
`logprobs` (the prompt's log-probabilities), tools (`tools`, `tool_choice`, `functions`,
`function_call`), and token-id prompts. Bad input (a grammar or schema llama.cpp cannot parse, a
logit_bias token beyond the vocabulary, an option out of range) is a ValueError before anything is
fed: the stream stays as it was.

Embeddings come from a second llama.cpp context over the same weights (`runtime.Embedder`, made at
the first `embed`), pooled as the model says or as `pooling_type` asks; it reads up to
min(n_ctx, n_batch) tokens of each text, as llama-cpp-python's does, and leaves the stream alone.
"""
from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .generation import Piece, Sampler, TokenLogprob, reset_sampler
from .memory import MemoryConfig
from .openai_format import (ROOT, InvalidRequest, chain, chat_from_completion_logprobs, check_roles, completion_logprobs,
                            delta_choice, head, message_choice, refuse_unsupported, response_format_sampling,
                            role_chunk, text_choice, usage)
from .policies import DEFAULT_POLICY, Policy, make_policy
from .runtime.closing import Closing
from .runtime.embedding import POOLING_UNSPECIFIED, Embedder
from .runtime.sampler import SamplerOptions, grammar_text
from .session import StreamSession
from .tools import CallStream, ToolUse, message_text, parse_reply

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama-cpp-python's: a random seed

#: llama-cpp-python's constructor options about speed, memory mapping or logging: accepted, no effect
#: here (`embedding`: `embed` works either way)
IGNORED_OPTIONS = {"n_ubatch", "n_threads_batch", "use_mmap", "use_mlock", "main_gpu", "split_mode",
                   "offload_kqv", "numa", "verbose", "logits_all", "embedding"}

#: llama-cpp-python's request options that this class does not implement, with their defaults
UNSUPPORTED = {"suffix": None, "functions": None, "function_call": None}

#: llama-cpp-python's logits processor: (input_ids, scores) -> scores; stopping criterion: (input_ids, logits) -> bool
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
StoppingCriterion = Callable[[np.ndarray, np.ndarray], bool]


@dataclass(frozen=True)
class LlamaSampling:
    """The sampling options that `create_completion` and `create_chat_completion` take as keywords
    beyond those they name, with llama-cpp-python's defaults (the module says what each does)."""
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    tfs_z: float = 1.0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: Mapping[int | str, float] | None = None
    grammar: Any = None  # GBNF text or a llama_cpp.LlamaGrammar
    logits_processor: Sequence[LogitsProcessor] | LogitsProcessor | None = None
    stopping_criteria: Sequence[StoppingCriterion] | StoppingCriterion | None = None

    def __post_init__(self) -> None:
        if self.tfs_z != 1.0:
            raise InvalidRequest(f"tfs_z={self.tfs_z!r}: llama.cpp has no tail-free sampling any more "
                                 "(llama-cpp-python 0.3.36 ignores tfs_z); leave it at 1.0", param="tfs_z",
                                 code="unsupported")

    def chain_options(self, penalty_last_n: int) -> dict:
        """`runtime.SamplerOptions` keywords of these options, but the processors."""
        try:
            bias = {int(token): float(value) for token, value in (self.logit_bias or {}).items()}
        except (TypeError, ValueError):
            raise InvalidRequest(f"logit_bias maps token ids to numbers (got {self.logit_bias!r})",
                                 param="logit_bias") from None
        grammar = {} if self.grammar is None else {"grammar": grammar_text(self.grammar)}
        return {"typical_p": self.typical_p, "repeat_penalty": self.repeat_penalty,
                "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
                "penalty_last_n": penalty_last_n, "mirostat": self.mirostat_mode, "mirostat_tau": self.mirostat_tau,
                "mirostat_eta": self.mirostat_eta, "logit_bias": bias, **grammar}


class Processors:
    """llama-cpp-python's `logits_processor` and `stopping_criteria` around a sampler (llama.cpp's
    chain). Each processor takes (input_ids, scores) and returns the scores, in turn, before the
    chain draws (llama-cpp-python runs them first in its chain); each criterion takes (input_ids,
    logits) once a token is drawn, and True ends the reply before that token ("stop"), as in
    llama-cpp-python. `input_ids` (NumPy intc) are the request's prompt as llama-cpp-python
    tokenizes it (a completion's text with BOS, a chat's messages as the template renders them),
    then the reply's tokens so far: what llama-cpp-python's context would hold at that step, so
    that a processor sees the same whatever the bounded stream holds (it may have evicted part of
    the prompt, and holds what came before it). `scores` and `logits`: a float32 copy of the
    model's logits (the log-probabilities a reply reports are the model's own)."""

    def __init__(self, sampler: Sampler, processors: Sequence[LogitsProcessor] | LogitsProcessor,
                 criteria: Sequence[StoppingCriterion] | StoppingCriterion, prompt_ids: Sequence[int], end_token: int):
        self.sampler, self.processors, self.criteria = sampler, callables(processors), callables(criteria)
        self.prompt_ids, self.end_token = list(prompt_ids), end_token
        self.ids = list(self.prompt_ids)

    def reset(self) -> None:
        reset_sampler(self.sampler)
        self.ids = list(self.prompt_ids)

    def __call__(self, logits: np.ndarray) -> int:
        input_ids = np.array(self.ids, dtype=np.intc)
        scores = logits.copy()
        for process in self.processors:
            scores = process(input_ids, scores)
        token = self.sampler(np.asarray(scores, dtype=np.float32))
        if any(stop(input_ids, logits) for stop in self.criteria):
            return self.end_token
        self.ids.append(token)
        return token


class LlamaState:
    """What `Llama.save_state` returns and `load_state` takes back: the stream's whole state
    (`StreamSession.snapshot`: llama.cpp's cells, the cache's bookkeeping, the generator that
    draws the seeds, the memory) and what the `Llama` knows the stream holds. Like
    llama-cpp-python's: `llama_state` (llama.cpp's cells, bytes), `llama_state_size`, `n_tokens`
    (the cells cached), `seed` (the last seed); it pickles."""

    def __init__(self, snapshot: dict, held: tuple[str, list[str]], fits: tuple, n_tokens: int, seed: int):
        self.snapshot, self.held, self.fits, self.n_tokens, self.seed = snapshot, held, fits, n_tokens, seed

    @property
    def llama_state(self) -> bytes:
        return self.snapshot["runtime"][1]["cells"].tobytes()

    @property
    def llama_state_size(self) -> int:
        return int(self.snapshot["runtime"][1]["cells"].nbytes)


def _message_part(message: dict) -> bytes:
    """What identifies a message in the chain of digests of the messages the stream holds: its
    role and text as the stream holds them (tool calls as the model writes them)."""
    return json.dumps(message_text(message, "messages")).encode()


def _chat_root(use: ToolUse | None) -> str:
    """Where the chain of a chat's digests starts: the tools it declares are rendered before its messages."""
    return ROOT if use is None else chain([json.dumps(use.openai_tools(), sort_keys=True).encode()])[1]


class Embeddings:
    """The embedding methods of `Llama`, over an `Embedder` made at first use."""
    _session: StreamSession
    _embedder: Embedder | None
    _embedder_options: dict
    model_path: str

    def _embedding_context(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self._session.model, **self._embedder_options)
        return self._embedder

    def pooling_type(self) -> int:
        """llama.h's pooling type of the embeddings (0: none, a vector per token; 1: mean; 2: CLS; 3: last)."""
        return self._embedding_context().pooling_type

    def embed(self, input: str | list[str], normalize: bool = False, truncate: bool = True,
              return_count: bool = False):
        """The embedding of a text (a list of floats; with no pooling, a list per token), or a list
        of them for a list of texts; with `return_count`, also the number of tokens read. Each text
        is cut to the embedding context's length (`truncate`; else ValueError); `normalize`: each
        vector to unit length."""
        embedder = self._embedding_context()
        vectors, total = [], 0
        for text in [input] if isinstance(input, str) else input:
            tokens = self.tokenize(text.encode("utf-8"))
            if len(tokens) > embedder.n_tokens and not truncate:
                raise ValueError(f"Requested tokens ({len(tokens)}) exceed batch size of {embedder.n_tokens}")
            tokens = tokens[:embedder.n_tokens]
            total += len(tokens)
            vector = embedder.embed(tokens).astype(np.float64)
            if normalize:
                norm = np.linalg.norm(vector, axis=-1, keepdims=True)
                vector = np.divide(vector, norm, out=vector, where=norm > 0)
            vectors.append(vector.tolist())
        out = vectors[0] if isinstance(input, str) else vectors
        return (out, total) if return_count else out

    def create_embedding(self, input: str | list[str], model: str | None = None) -> dict:
        """OpenAI's embeddings response: {"object": "list", "data": [{"object": "embedding", "embedding",
        "index"}], "model", "usage"}."""
        vectors, total = self.embed([input] if isinstance(input, str) else input, return_count=True)
        return {"object": "list", "model": model or self.model_path,
                "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": total, "total_tokens": total}}


class States:
    """The state methods of `Llama`: what the stream holds and the last seed."""
    _session: StreamSession
    model_path: str
    _held_text: str
    _held_chat: list[str]
    _seed: int

    def reset(self) -> None:
        """Forget the stream: the next prompt is read from the start."""
        self._session.reset()
        self._held_text, self._held_chat = "", []

    def set_seed(self, seed: int) -> None:
        """The last seed, from which the next request without a seed draws its own."""
        self._seed = seed

    def save_state(self) -> LlamaState:
        """The stream's state now (a copy of its cells: `llama_state_size` bytes), for `load_state`."""
        return LlamaState(self._session.snapshot(), (self._held_text, list(self._held_chat)), self._fits(),
                          self._session.stats.cells_cached, self._seed)

    def load_state(self, state: LlamaState) -> None:
        """Back to a state that `save_state` took, in this Llama or another of the same model and settings."""
        if state.fits != self._fits():
            raise ValueError(f"this state was saved by a Llama of other settings {state.fits}, not {self._fits()}")
        self._session.rollback(state.snapshot)
        self._held_text, self._held_chat = state.held[0], list(state.held[1])
        self._seed = state.seed

    def _fits(self) -> tuple:
        """What a saved state must have been saved with to load here."""
        s = self._session
        memory = None if s.memory is None else s.memory.config.config()
        return self.model_path, json.dumps([s.policy.config(), s.chunk, memory], sort_keys=True)


class Llama(Embeddings, States, Closing):
    """See the module. Extra keywords: `policy` (a `Policy`, or a name for its defaults at budget
    `n_ctx`), `memory` (a `MemoryConfig`, True or False), `chunk` (tokens per decode)."""

    def __init__(self, model_path: str, *, n_ctx: int = 512, n_batch: int = 512, n_threads: int | None = None,
                 n_gpu_layers: int = 0, seed: int = LLAMA_DEFAULT_SEED, flash_attn: bool = False,
                 chat_format: str | None = None, last_n_tokens_size: int = 64,
                 pooling_type: int = POOLING_UNSPECIFIED, policy: Policy | str = DEFAULT_POLICY,
                 memory: MemoryConfig | bool = True, chunk: int = 256, **options):
        unknown = sorted(set(options) - IGNORED_OPTIONS)
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r} (this Llama takes llama-cpp-python's "
                            "model_path, n_ctx, n_batch, n_threads, n_gpu_layers, seed, flash_attn, "
                            "last_n_tokens_size, pooling_type and ignores "
                            f"{', '.join(sorted(IGNORED_OPTIONS))})")
        if chat_format is not None:
            raise ValueError("chat_format: this Llama always uses the model's own chat template (leave it None)")
        self.model_path = str(model_path)
        self._embedder = None
        if not isinstance(policy, Policy):  # `recent` cut to fit a small n_ctx (32 in llama-cpp-python's tests)
            policy = make_policy(policy).with_budget(n_ctx)
        self._session = StreamSession(model_path, policy, chunk=min(chunk, n_ctx),
                                      n_gpu_layers=n_gpu_layers, n_threads=n_threads, flash_attn=flash_attn,
                                      seed=None if seed == LLAMA_DEFAULT_SEED else seed,
                                      memory=memory)
        if self._session.model.chat_template() is not None:
            self._session.render_chats_with(self._session.model.render_chat_jinja)
        self._penalty_last_n = last_n_tokens_size
        self._seed = seed  # the last request's, as llama-cpp-python keeps it
        self._embedder_options = {"n_tokens": min(n_ctx, n_batch), "pooling": pooling_type,
                                  "flash_attn": flash_attn, "n_threads": n_threads}
        self._held_text = ""      # the completion text the stream holds (prompts and replies)
        self._held_chat: list[str] = []  # digests of the chat messages it holds, in order

    # -- llama-cpp-python's small methods ---------------------------------------------------
    def n_ctx(self) -> int:
        return self._session.policy.budget

    def n_embd(self) -> int:
        return self._session.model.n_embd

    def n_vocab(self) -> int:
        return self._session.model.n_vocab

    def token_bos(self) -> int:
        return self._session.model.bos_token

    def token_eos(self) -> int:
        return self._session.model.eos_token

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._session.model.tokenize(text.decode("utf-8", errors="replace"), add_special=add_bos,
                                            parse_special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = False) -> bytes:
        return b"".join(self._session.model.token_bytes(t) for t in tokens)

    def close(self) -> None:
        if getattr(self, "_embedder", None) is not None:
            self._embedder.close()
            self._embedder = None
        if getattr(self, "_session", None) is not None:
            self._session.close()
            self._session = None


    # -- completions -------------------------------------------------------------------------
    def __call__(self, prompt: str, **options):
        return self.create_completion(prompt, **options)

    def create_completion(self, prompt: str, max_tokens: int | None = 16, temperature: float = 0.8,
                          top_p: float = 0.95, min_p: float = 0.05, stop: str | list[str] | None = None,
                          top_k: int = 40, stream: bool = False, seed: int | None = None, model: str | None = None,
                          logprobs: int | None = None, echo: bool = False, **options):
        """Text after `prompt`: a `text_completion` dict, or an iterator of its chunks (`stream`)."""
        sampling = request_sampling(options)
        if not isinstance(prompt, str):
            raise ValueError("prompt: this Llama takes text (token-id prompts are not supported)")
        if echo and logprobs is not None:
            raise InvalidRequest("echo with logprobs: this Llama does not compute the prompt's log-probabilities",
                                 param="echo", code="unsupported")
        session = self._session
        prompt_ids = session.model.tokenize(prompt, add_special=True)
        sampler = self._sampler(sampling, temperature, top_p, top_k, min_p, seed, lambda: prompt_ids)
        held = self._held_text
        if self._held_chat or not held or not prompt.startswith(held):
            session.reset()  # not a continuation of what the stream holds: read the prompt from the start
            held = ""
        self._held_chat, self._held_text = [], ""  # until the reply is in: a failure leaves nothing to continue
        pieces = session.generate(prompt[len(held):], sampler=sampler, **self._limits(max_tokens, stop, logprobs))
        top = head(f"cmpl-{uuid.uuid4()}", "text_completion", model or self.model_path)
        offsets = TextOffsets(len(prompt))

        def remember(text: str) -> None:
            self._held_text = prompt + text

        def choice(text: str, finish: str | None, noted: Sequence[TokenLogprob] | None) -> dict:
            return text_choice(text, finish, self._completion_logprobs(noted, offsets))
        if stream:
            return self._stream(pieces, top, choice, remember,
                                first={**top, "choices": [text_choice(prompt, None, None)]} if echo else None)
        text, noted = self._join(pieces)
        remember(text)
        reply = session.last_reply
        return {**top, "choices": [choice(prompt + text if echo else text, reply.finish_reason, noted)],
                "usage": usage(len(prompt_ids), reply.n_tokens)}

    def create_chat_completion(self, messages: list[dict], temperature: float = 0.2, top_p: float = 0.95,
                               top_k: int = 40, min_p: float = 0.05, stream: bool = False,
                               stop: str | list[str] | None = None, seed: int | None = None,
                               response_format: dict | None = None, max_tokens: int | None = None,
                               model: str | None = None, logprobs: bool | None = None,
                               top_logprobs: int | None = None, tools: list[dict] | None = None,
                               tool_choice: str | dict | None = None, **options):
        """The assistant's reply to `messages`: a `chat.completion` dict, or an iterator of
        `chat.completion.chunk` dicts (`stream`); with `tools`, its calls as `tool_calls`."""
        sampling = request_sampling(options)
        turns = checked_messages(messages)
        session = self._session
        use = ToolUse.of(tools, tool_choice)
        formatted = response_format_sampling(response_format)
        if (formatted or use is not None) and sampling.grammar is not None or formatted and use is not None:
            raise InvalidRequest("a grammar, a response_format and tools each constrain the reply: give one of them",
                                 param="response_format" if formatted else "tools")
        declared = None if use is None else use.openai_tools()
        sampler = self._sampler(sampling, temperature, top_p, top_k, min_p, seed, lambda: session.model.tokenize(
            session.model.render_chat_jinja([(role, text) for role, text, _ in turns], True, tools=declared),
            add_special=False, parse_special=True), use.sampling() if use is not None else formatted)
        digests = chain(map(_message_part, messages), _chat_root(use))
        held = len(self._held_chat)
        if self._held_text or not held or held >= len(messages) or self._held_chat != digests[1:held + 1]:
            session.reset()  # not a continuation of what the stream holds: read the whole conversation
            held = 0
        self._held_chat, self._held_text = [], ""  # until the reply is in: a failure leaves nothing to continue
        system = turns[0][1] if turns[0][0] == "system" and held == 0 else None
        new = turns[held:]
        if new and new[0][0] == "system":
            new = new[1:]
        last = last_round(new)
        session.read_turns(new[:-len(last)], system, tools=declared)
        top = top_logprobs if logprobs else None  # as llama-cpp-python: logprobs alone asks for none
        pieces = session.chat_stream(last if last[0][0] == "tool" else last[0][1],
                                     system=system if len(new) == len(last) else None, sampler=sampler,
                                     tools=declared, **self._limits(max_tokens, stop, top))
        reply = ChatReply(f"chatcmpl-{uuid.uuid4()}", model or self.model_path, use, self._completion_logprobs)

        def remember(text: str) -> None:
            self._held_chat = digests[1:] + chain([_message_part(reply.message(text))], digests[-1])[1:]
        if stream:
            return reply.stream(pieces, remember)
        text, noted = self._join(pieces)
        remember(text)
        # the whole conversation read so far, as llama-cpp-python counts its prompt
        return reply.whole(text, session.last_reply, noted, session.stats.tokens_seen - session.last_reply.n_tokens)

    # -- shared ------------------------------------------------------------------------------
    def _sampler(self, sampling: LlamaSampling, temperature: float, top_p: float, top_k: int, min_p: float,
                 seed: int | None, prompt_ids: Callable[[], list[int]], formatted: Mapping | None = None) -> Sampler:
        """llama.cpp's chain for a request (`formatted`: response_format's options), behind its logits
        processors and stopping criteria if any; ValueError for a bad option, before anything is fed."""
        seed = seed if seed is not None else random.Random(self._seed).randint(0, 2**32)  # as llama-cpp-python
        chain_sampler = self._session.chain_sampler(
            temperature=temperature, top_p=top_p, top_k=max(top_k, 0), min_p=min_p, grammar_first=True,
            seed=chain_seed(seed), **sampling.chain_options(self._penalty_last_n), **(formatted or {}))
        self._seed = seed
        if not (sampling.logits_processor or sampling.stopping_criteria):
            return chain_sampler
        end = self._session.model.eos_token
        if sampling.stopping_criteria and end < 0:
            raise InvalidRequest(f"stopping_criteria: {self._session.model.name} has no end-of-sequence token to "
                                 "end a reply with", param="stopping_criteria")
        return Processors(chain_sampler, sampling.logits_processor or (), sampling.stopping_criteria or (),
                          prompt_ids(), end)

    def _limits(self, max_tokens: int | None, stop: str | list[str] | None, logprobs: int | None) -> dict:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        limit = max_tokens if max_tokens is not None and max_tokens > 0 else self.n_ctx()  # as llama-cpp-python
        return {"max_tokens": limit, "stop": stops, "logprobs": logprobs}

    def _token_text(self, token: int) -> str:
        return self._session.model.token_bytes(token).decode("utf-8", errors="ignore")  # as llama-cpp-python

    def _completion_logprobs(self, noted: Sequence[TokenLogprob] | None, offsets: TextOffsets) -> dict | None:
        """llama-cpp-python's completion `logprobs` of the tokens `noted`: each token's text, text
        offset and log-probability, and the top ones by text (the sampled token's included)."""
        if noted is None:
            return None
        texts = [self._token_text(t.token) for t in noted]
        out = completion_logprobs(texts, [t.logprob for t in noted],
                                  [{**{self._token_text(i): lp for i, lp in t.top}, text: t.logprob}
                                   for t, text in zip(noted, texts)], offsets.at)
        offsets.at += sum(map(len, texts))
        return out

    @staticmethod
    def _join(pieces: Iterator[Piece]) -> tuple[str, list[TokenLogprob] | None]:
        """A whole reply: its text and its tokens' logprobs (None unless asked for)."""
        text, noted = "", None
        for piece in pieces:
            text += piece
            if piece.logprobs is not None:
                noted = noted if noted is not None else []
                noted.extend(piece.logprobs if piece.finish_reason is None else ())
        return text, noted

    def _stream(self, pieces: Iterator[Piece], head: dict, choice, remember,
                first: dict | None = None) -> Iterator[dict]:
        text, finish = "", None
        try:
            if first is not None:
                yield first
            for piece in pieces:
                text += piece
                finish = piece.finish_reason
                if piece.finish_reason is None and (piece or piece.logprobs):
                    yield {**head, "choices": [choice(piece.text, None, piece.logprobs)]}
        finally:
            pieces.close()
            remember(text)
        yield {**head, "choices": [choice("", finish, None)]}


class TextOffsets:
    """Where the next token's text starts in the whole text (streamed replies count on from one chunk
    to the next)."""

    def __init__(self, at: int):
        self.at = at


def callables(given: Sequence[Callable] | Callable) -> list[Callable]:
    """A list of callables, or one (llama-cpp-python's LogitsProcessorList and StoppingCriteriaList
    are both: one call runs them all)."""
    return [given] if callable(given) else list(given)


def chain_seed(seed: int) -> int | None:
    """The chain's seed for llama-cpp-python's `seed`, as llama.cpp's uint32 takes it; None (the
    stream's generator draws one) for llama.cpp's "random seed" (2**32 - 1, and so -1)."""
    seed %= 2**32
    return seed if seed <= SamplerOptions.MAX_SEED else None


def request_sampling(options: dict) -> LlamaSampling:
    """A request's sampling keywords: ValueError (`InvalidRequest`) for one of llama-cpp-python's
    options that this class does not implement set to anything but its default (or `tfs_z`),
    TypeError for one llama-cpp-python does not have."""
    refuse_unsupported(options, UNSUPPORTED, lambda name, value: f"{name}={value!r}: this Llama does not implement "
                                                                  f"{name} (leave it at its default)")
    return LlamaSampling(**{name: value for name, value in options.items() if name not in UNSUPPORTED})


def checked_messages(messages: list[dict]) -> list[tuple[str, str, list]]:
    """(role, text, media) of each message: text content only (an assistant's tool calls as the
    model writes them), a system message first, the last message the user's or a tool's."""
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequest(f"messages[{i}] is not a message", param=f"messages[{i}]")
        turns.append((*message_text(m, f"messages[{i}]"), []))
    check_roles([role for role, _, _ in turns], assistant_answers_user=False)  # llama-cpp-python renders any order
    return turns


def last_round(turns: list[tuple[str, str, list]]) -> list[tuple[str, str]]:
    """The messages the reply answers: the tool results at the end in a row, or the last message."""
    n = 1
    while turns[-1][0] == "tool" and n < len(turns) and turns[-n - 1][0] == "tool":
        n += 1
    return [(role, text) for role, text, _ in turns[-n:]]


class ChatReply:
    """The shape of a chat reply (`chat.completion` or its chunks): its text, or, where the request
    declares tools, its calls as `tool_calls` (finish_reason "tool_calls") and the text before them."""

    def __init__(self, rid: str, model: str, use: ToolUse | None, completion_logprobs):
        self.rid, self.model, self.completion_logprobs = rid, model, completion_logprobs
        self.names = [] if use is None or use.choice == "none" else [t.name for t in use.tools]
        self.offsets = TextOffsets(0)

    def parsed(self, text: str) -> tuple[str | None, list]:
        return parse_reply(text, self.names) if self.names else (text, [])

    def message(self, text: str) -> dict:
        """The assistant message the reply is, as a client sends it back."""
        content, calls = self.parsed(text)
        return {"role": "assistant", "content": content, "tool_calls": [c.as_openai() for c in calls]}

    def logprobs(self, noted: Sequence[TokenLogprob] | None) -> dict | None:
        return chat_from_completion_logprobs(self.completion_logprobs(noted, self.offsets))

    def whole(self, text: str, reply, noted: Sequence[TokenLogprob] | None, n_prompt: int) -> dict:
        content, calls = self.parsed(text)
        return {**head(self.rid, "chat.completion", self.model),
                "choices": [message_choice(content, "tool_calls" if calls else reply.finish_reason,
                                           self.logprobs(noted), [c.as_openai() for c in calls])],
                "usage": usage(n_prompt, reply.n_tokens)}

    def stream(self, pieces: Iterator[Piece], remember: Callable[[str], None]) -> Iterator[dict]:
        """The reply's chunks: the role, then each piece of text (with its logprobs) or of a tool call."""
        chunk_head = head(self.rid, "chat.completion.chunk", self.model)
        calls = CallStream(self.names) if self.names else None
        text, finish = "", None

        def chunk(delta: dict | None = None, finish: str | None = None, noted=None) -> dict:
            return {**chunk_head, "choices": [delta_choice(None, finish, self.logprobs(noted), delta or {})]}
        try:
            yield role_chunk(chunk_head)
            for piece in pieces:
                text += piece
                finish = piece.finish_reason
                if piece.finish_reason is not None or not (piece or piece.logprobs):
                    continue
                if calls is None:
                    yield chunk({"content": piece.text}, noted=piece.logprobs)
                else:
                    yield from (chunk(delta) for delta in calls.feed(piece.text))
            if calls is not None:
                yield from (chunk(delta) for delta in calls.finish())
        finally:
            pieces.close()
            remember(text)
        yield chunk(finish="tool_calls" if calls is not None and calls.calls else finish)
