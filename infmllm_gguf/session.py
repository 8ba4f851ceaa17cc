"""`StreamSession`: stream text, images and chat rounds into a model through a KV cache of fixed size.

The session composes the layers (docs/ARCHITECTURE.md): a `Model` and its `Runtime` context, the
`CacheController` that keeps the cache to the policy's budget, the memory that listens to it, the
generator and its streaming detokenizer (`generation`), the `ChatTranscript` (`Conversation`), an
optional vision `Projector` (`MediaInput`), and the save format (`state`), where each part gives
and takes its own state.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .controller import CacheController, CacheStats
from .conversation import Conversation
from .media_input import MediaInput
from .memory import MemoryConfig, memory_for
from .persistence import Persistence
from .generation import DEFAULTS, LogprobSampler, Piece, Reply, Sampler, StreamingDetokenizer, nll_of, reply_pieces
from .multimodal import Projector
from .policies import DEFAULT_POLICY, Policy, make_policy
from .runtime import ChainSampler, Model, Runtime, SamplerOptions, check_cache_types
from .state import return_freed_memory

__all__ = ["SessionConfig", "StreamSession", "return_freed_memory"]


@dataclass(frozen=True)
class SessionConfig:
    """How a session runs, its model aside: the eviction policy (a `Policy`, or a name for its
    defaults), the chunk, llama.cpp's backend (GPU layers, threads, flash attention, KV cache
    types, rpc-servers), the memory and the sampler's seed, each as `StreamSession` names it.
    Declared once: `StreamSession.from_config`, the runs (`stream_perplexity`, `run_recall`,
    `run_chat_recall`), the benchmarks, the server and `Llama` take one."""
    policy: Policy = field(default_factory=lambda: make_policy(DEFAULT_POLICY))
    chunk: int = 256
    generation_headroom: int | None = None
    n_gpu_layers: int = -1
    n_threads: int | None = None
    flash_attn: bool | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    rpc: tuple[str, ...] = ()
    memory: MemoryConfig | bool | None = True
    seed: int | None = 0

    def __post_init__(self) -> None:
        if isinstance(self.policy, str):
            object.__setattr__(self, "policy", make_policy(self.policy))
        object.__setattr__(self, "rpc", tuple(self.rpc))

    @classmethod
    def of(cls, policy: Policy | str = DEFAULT_POLICY, **options) -> "SessionConfig":
        """A config from a policy name and keywords, as `StreamSession` takes them: those that name
        a field here set it, the others are the policy's options
        (``SessionConfig.of("h2o", budget=256, chunk=64)``)."""
        mine = {f.name for f in dataclasses.fields(cls)}
        policy_options = {k: v for k, v in options.items() if k not in mine}
        if policy_options:
            if isinstance(policy, Policy):
                raise ValueError(f"options {', '.join(policy_options)} go with a policy name; a Policy object "
                                 "carries its own")
            policy = make_policy(policy, **policy_options)
        return cls(policy, **{k: v for k, v in options.items() if k in mine})

    def replace(self, **changes) -> "SessionConfig":
        return dataclasses.replace(self, **changes)

    def keywords(self) -> dict:
        """`StreamSession`'s keywords, but the policy."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "policy"}


class StreamSession(Conversation, MediaInput, Persistence):
    """A model reading an endless stream in `policy.budget` cells.

    `model`: a GGUF path (None: the default model) or a loaded `Model`, which sessions can share.
    `policy`: a `Policy`, or a policy name with that policy's options as keywords
    (``StreamSession(m, "inf-mllm", budget=512, bias=1.0)``). The llama.cpp context holds
    `budget + max(chunk, generation_headroom)` cells and never grows; generation evicts every
    `generation_headroom` tokens (default: the chunk, which costs no cell more). `mmproj`, the
    model's vision projector GGUF, enables `feed_image`, `feed_video` and media in `chat`.
    `view_tokens` keeps the token ids of the stream's last `view_tokens` tokens for display
    (`recent_view`).
    `cache_type_k`/`cache_type_v` (f16, q8_0, q4_0) quantize the KV cache;
    `rpc` (HOST:PORT of rpc-servers) puts the model's layers on other machines (`Model`).
    `memory` keeps the stream's text beyond the budget and re-reads what each prompt needs
    (`infmllm_gguf.memory`): True (the default) for the default `MemoryConfig` where the policy
    evicts and the budget has room for it, a `MemoryConfig` of your own, or False (None) for none.
    A stream without prompts reads the same with it or without (it only records).
    """

    def __init__(self, model: Model | str | os.PathLike | None = None, policy: Policy | str = DEFAULT_POLICY, *,
                 chunk: int = 256, generation_headroom: int | None = None, n_gpu_layers: int = -1,
                 n_threads: int | None = None, flash_attn: bool | None = None, seed: int | None = 0,
                 mmproj: str | os.PathLike | None = None, view_tokens: int = 0, cache_type_k: str = "f16",
                 cache_type_v: str = "f16", rpc: Sequence[str] = (), memory: MemoryConfig | bool | None = True,
                 **policy_options):
        if isinstance(policy, Policy):
            if policy_options:
                raise ValueError(f"options {', '.join(policy_options)} go with a policy name; a Policy object "
                                 "carries its own")
            self.policy = policy
        else:
            self.policy = make_policy(policy, **policy_options)
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 token (got {chunk}): pass --chunk N")
        self.policy.check_chunk(chunk)
        self.chunk = chunk
        self.generation_headroom = chunk if generation_headroom is None else generation_headroom
        if self.generation_headroom < 1:
            raise ValueError(f"generation_headroom must be at least 1 token (got {generation_headroom})")
        self.flash_attn = flash_attn
        self.cache_types = (cache_type_k, cache_type_v)
        check_cache_types(cache_type_k, cache_type_v, flash_attn)  # before a model loads for nothing
        self.memory = memory_for(memory, self.policy)
        self._owns_model = not isinstance(model, Model)
        self.model = Model(model, n_gpu_layers=n_gpu_layers, rpc=rpc) if self._owns_model else model
        self.runtime = self.projector = None
        try:
            eval_callback = self.memory.prepare(self.model, n_threads) if self.memory is not None else None
            self.runtime = Runtime(self.model, n_ctx=self.policy.budget + max(chunk, self.generation_headroom),
                                   n_batch=chunk, flash_attn=flash_attn, n_threads=n_threads,
                                   cache_type_k=cache_type_k, cache_type_v=cache_type_v, eval_callback=eval_callback)
            if mmproj is not None:
                self.projector = Projector(mmproj, self.model, use_gpu=self.model.n_gpu_layers != 0,
                                           n_threads=n_threads)
            self.cache = CacheController(self.runtime, self.policy, generation_headroom=self.generation_headroom,
                                         view_tokens=view_tokens,
                                         shared_image_positions=self.projector is not None and self.projector.uses_mrope,
                                         listeners=() if self.memory is None else (self.memory.record,))
            self.policy = self.cache.policy  # with its granularity settled for this model
        except Exception:
            self.close()
            raise
        self.rng = np.random.default_rng(seed)
        self.transcript = self.new_transcript(self.model.render_chat)
        self.last_reply: Reply | None = None  # how the last generation ended

    # -- lifetime ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, model: Model | str | os.PathLike | None, config: SessionConfig, *,
                    mmproj: str | os.PathLike | None = None, view_tokens: int = 0) -> "StreamSession":
        """A session of `model` made as `config` says (`mmproj` and `view_tokens` as in the constructor)."""
        return cls(model, config.policy, mmproj=mmproj, view_tokens=view_tokens, **config.keywords())

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
        if self.projector is not None:
            self.projector.close()
        if self.runtime is not None:
            self.runtime.close()
        if self._owns_model:
            self.model.close()

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the stream: empty cache, counters at zero, no chat."""
        self.cache.reset()
        self.transcript.reset()
        if self.memory is not None:
            self.memory.reset()

    # -- state ------------------------------------------------------------------------------
    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    @property
    def bounded_layers(self) -> tuple[int, ...]:
        """The layers whose KV cache the budget bounds: every layer, but a hybrid model's recurrent
        ones (their state is of fixed size already)."""
        return self.runtime.kv_layers

    def cached_stream_indices(self) -> np.ndarray:
        """The stream indices (token numbers in the stream) of the tokens cached now, ascending (with
        per-layer eviction: those that at least one layer holds)."""
        return np.unique(self.cache.cells.held_by_layer)

    def recent_view(self) -> list[tuple[int, str, bool]]:
        """The last `view_tokens` tokens of the stream as (stream index, text, still cached): text in
        whole characters (a character split across tokens shows on its last token; an image
        token as "[image]")."""
        tokens = list(self.cache.recent_tokens)
        first = self.stats.tokens_seen - len(tokens)
        cached = np.isin(np.arange(first, first + len(tokens)), self.cached_stream_indices())
        detokenizer = StreamingDetokenizer(self.model.token_bytes)
        return [(first + i, "[image]" if t < 0 else detokenizer.add(t), bool(c))
                for i, (t, c) in enumerate(zip(tokens, cached))]

    # -- feeding ----------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`; BOS only at the very start of the stream."""
        return self.model.tokenize(text, add_special=self.cache.stats.tokens_seen == 0, parse_special=special)

    def feed_text(self, text: str, *, special: bool = False) -> int:
        return self.feed_tokens(self.tokenize(text, special=special))

    def feed_prompt(self, text: str, *, special: bool = False, query: str | None = None) -> int:
        """Feed a prompt (a question, a user turn): with a memory, the blocks of the stream's past
        that `query` (default: the prompt itself) ranks best are re-read first, in the budget."""
        tokens = self.tokenize(text, special=special)
        if self.memory is None:
            return self.feed_tokens(tokens)
        wanted = tokens if query is None else self.model.tokenize(query, add_special=False, parse_special=False)
        self.memory.read_prompt(self.cache, wanted, tokens, self.chunk)
        return len(tokens)

    def feed_tokens(self, token_ids: Sequence[int]) -> int:
        """Append token ids to the stream in chunks, evicting as needed; returns how many were fed."""
        token_ids = list(token_ids)
        self.cache.feed(token_ids, self.chunk)
        return len(token_ids)

    def token_nll(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feed `token_ids` and return the negative log-likelihood of each token given the stream
        before it, as the bounded cache sees it (float64[len(token_ids)]; one fewer when the stream
        starts here, since its first token has nothing to be predicted from)."""
        token_ids = np.asarray(token_ids, dtype=np.int64)
        out = []
        if self.cache.stats.tokens_seen and token_ids.size:
            out.append(nll_of(self.runtime.logits()[None], token_ids[:1]))
        for i in range(0, token_ids.size, self.chunk):
            piece = token_ids[i:i + self.chunk]
            self.cache.decode(piece.tolist(), logits="all")
            logits = self.runtime.all_logits(piece.size)
            out.append(nll_of(logits[:-1], piece[1:]))
            if i + self.chunk < token_ids.size:
                out.append(nll_of(logits[-1:], token_ids[i + self.chunk:i + self.chunk + 1]))
        return np.concatenate(out) if out else np.zeros(0)

    # -- generation -------------------------------------------------------------------------
    def chain_sampler(self, **sampling) -> ChainSampler:
        """llama.cpp's sampler chain over this model with `sampling` (`runtime.SamplerOptions`), as
        `generate` makes it: without a `seed`, the session's generator draws one (not at temperature 0,
        which draws nothing). ValueError for a bad option, grammar or schema."""
        options = SamplerOptions(**sampling)
        seed = options.seed
        if seed is None:  # greedy draws nothing: the session's generator is left as it is
            seed = 0 if options.temperature == 0 else int(self.rng.integers(0, SamplerOptions.MAX_SEED + 1))
        return ChainSampler(self.model, options, seed=seed)

    def generate(self, prompt: str | None = None, *, max_tokens: int = DEFAULTS.max_tokens, stop: Sequence[str] = (),
                 special: bool = False, sampler: Sampler | None = None, logprobs: int | None = None,
                 **sampling) -> Iterator[Piece]:
        """Feed `prompt` (if any) now, then return an iterator that samples up to `max_tokens`
        tokens and yields the reply in `Piece`s (text with counts, speeds and, on the last one, an
        empty text and the `finish_reason`).

        `sampling`: the options of llama.cpp's sampler chain, as `runtime.SamplerOptions` names and
        documents them, with their defaults (temperature, top_k, top_p, min_p, typical_p,
        repeat_penalty, frequency_penalty, presence_penalty, penalty_last_n, logit_bias, seed,
        grammar, json_schema); without a `seed`, the session's generator draws one. `sampler`
        (logits -> token id) replaces the chain and its options. `logprobs`:
        None, or each piece carries its tokens' log-probabilities with that many alternatives.
        Stops at an end-of-generation token (with a grammar: once it is complete), or when a `stop`
        string appears (not yielded); `last_reply` then says how many tokens were sampled and why it
        stopped. While generating, the cache may hold up to budget + generation_headroom cells; at
        the end it is brought back to the budget.
        """
        if sampler is not None and sampling:
            raise ValueError(f"sampling options ({', '.join(sampling)}) go without a sampler: the sampler replaces them")
        sampler = sampler or self.chain_sampler(**sampling)  # bad options fail before the prompt is fed
        t0 = time.perf_counter()
        n_prompt = self.feed_prompt(prompt, special=special) if prompt else 0
        prompt_tps = n_prompt / max(time.perf_counter() - t0, 1e-9)
        self.last_reply = Reply()
        noting = None if logprobs is None else LogprobSampler(sampler, logprobs)
        return reply_pieces(self.cache, sampler, max_tokens=max_tokens, stop=stop,
                            is_end=self.model.is_end_of_generation, token_bytes=self.model.token_bytes,
                            reply=self.last_reply, n_prompt=n_prompt, prompt_tps=prompt_tps, noting=noting)
