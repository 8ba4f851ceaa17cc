"""`StreamSession`: stream text, images and chat rounds into a model through a KV cache of fixed size.

The session composes the layers (docs/ARCHITECTURE.md): a `Model` and its `Runtime` context, the
`CacheController` that keeps the cache to the policy's budget, the generator and its streaming
detokenizer (`generation`), the `ChatTranscript`, an optional vision `Projector`, and the save
format (`state`).
"""
from __future__ import annotations

import copy
import ctypes
import inspect
import itertools
import os
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .controller import CacheController, CacheStats
from .chat import ChatTranscript
from .memory import Memory, MemoryConfig
from .generation import (DEFAULTS, LogprobSampler, Piece, Reply, Sampler, StreamingDetokenizer, generate_tokens,
                         make_sampler, text_pieces)
from .multimodal import ImageChunk, ImageLike, MediaPart, Projector, TextChunk
from .policies import DEFAULT_POLICY, Policy, from_config, make_policy
from .runtime import Model, Runtime, check_cache_types
from .state import read_header, read_state, write_state
from .video import VideoParts

try:  # glibc: see `return_freed_memory`
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


def return_freed_memory() -> None:
    """Hand the heap pages freed by a save or a load back to the OS. glibc keeps them, and a
    stream's resident size stepped up by 11-34 MiB at its first checkpoints (the copies of the
    state); with this it stays flat. A no-op where the C library is not glibc."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def nll_of(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row (float64). Only the log-sum-exp is
    computed, in float32 with a float64 sum: the whole log-softmax would dominate a long stream."""
    peak = logits.max(axis=-1)
    lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1, dtype=np.float64))
    return lse - logits[np.arange(len(targets)), targets].astype(np.float64)


def first_checked(parts: Iterable[MediaPart]) -> Iterator[MediaPart]:
    """`parts` with its first item taken now, so that an empty or failing source (a video with no
    frames) raises before anything is fed."""
    it = iter(parts)
    first = next(it, None)
    if first is None:
        raise ValueError("no media to feed: the source gave no frames")
    return itertools.chain([first], it)


def saved_policy(path: str | os.PathLike, config: dict) -> Policy:
    """The policy of a saved file's record, options added since filled in as the file ran them."""
    try:
        return from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path} names a policy this version cannot build ({exc})") from None


def renamed_keyword(options: dict, old: str, new: str, value):
    """`value`, or what `options` gives under a keyword's former name (taken out of it, with a
    DeprecationWarning): old names keep working for one release."""
    if old not in options:
        return value
    warnings.warn(f"the keyword {old}= is now {new}=", DeprecationWarning, stacklevel=3)
    return options.pop(old)


def known_settings(path: str | os.PathLike, saved: dict, known: Iterable[str]) -> dict:
    """The settings of a saved file that this version knows (a newer version's additions are left
    out with a warning; those the file lacks take their defaults)."""
    known = set(known)
    unknown = sorted(set(saved) - known)
    if unknown:
        warnings.warn(f"{path} was saved with settings this version does not know ({', '.join(unknown)}): "
                      "they are ignored", stacklevel=3)
    if "policy" not in saved:
        raise ValueError(f"{path} names no policy")
    return {k: v for k, v in saved.items() if k in known}


class StreamSession:
    """A model reading an endless stream in `policy.budget` cells.

    `model`: a GGUF path (None: the default model) or a loaded `Model`, which sessions can share.
    `policy`: a `Policy`, or a policy name with that policy's options as keywords
    (``StreamSession(m, "inf-mllm", budget=512, bias=1.0)``). The llama.cpp context holds
    `budget + max(chunk, generation_headroom)` cells and never grows; generation evicts every
    `generation_headroom` tokens (default: the chunk, which costs no cell more). `mmproj`, the
    model's vision projector GGUF, enables `feed_image`, `feed_video` and media in `chat`.
    `view_tokens` keeps the token ids of the stream's last `view_tokens` tokens for display
    (`recent_view`; `history`, its former name, still works until the next release).
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
        view_tokens = renamed_keyword(policy_options, "history", "view_tokens", view_tokens)
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
        self.memory = None
        if memory is True:  # the default: where the policy evicts and the budget leaves room for it
            if self.policy.name != "full" and Memory.fits(MemoryConfig(), self.policy.budget):
                self.memory = Memory(MemoryConfig(), self.policy.budget)
        elif memory:
            if self.policy.name == "full":
                raise ValueError("policy 'full' evicts nothing: it needs no memory (turn --memory off)")
            config = MemoryConfig.from_config(memory) if isinstance(memory, dict) else memory  # a saved file's
            self.memory = Memory(config, self.policy.budget)
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
                                         shared_image_positions=self.projector is not None and self.projector.uses_mrope)
            self.policy = self.cache.policy  # with its granularity settled for this model
            self.cache.memory = self.memory
        except Exception:
            self.close()
            raise
        self.rng = np.random.default_rng(seed)
        self.transcript = ChatTranscript(self.model.render_chat)
        self.last_reply: Reply | None = None  # how the last generation ended

    # -- lifetime ---------------------------------------------------------------------------
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
        return np.unique(self.cache.held_by_layer)

    def cached_positions(self) -> np.ndarray:
        """Deprecated name of `cached_stream_indices` (until the next release)."""
        warnings.warn("StreamSession.cached_positions() is now cached_stream_indices()", DeprecationWarning,
                      stacklevel=2)
        return self.cached_stream_indices()

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

    # -- saving -----------------------------------------------------------------------------
    def _identity(self) -> dict:
        m = self.model
        return {"model": m.name, "model_bytes": m.path.stat().st_size, "n_vocab": m.n_vocab,
                "n_layer": m.n_layer, "n_embd": m.n_embd, "n_ctx": self.runtime.n_ctx}

    def _settings(self) -> dict:
        return {"policy": self.policy.config(), "chunk": self.chunk,
                "generation_headroom": self.generation_headroom, "flash_attn": self.flash_attn,
                "cache_type_k": self.cache_types[0], "cache_type_v": self.cache_types[1],
                "memory": None if self.memory is None else self.memory.config.config()}

    def _components(self) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
        """Each component's state (metadata, arrays), as `save` writes them."""
        components = {"runtime": self.runtime.state(), "cache": self.cache.state(),
                      "chat": (self.transcript.state(), {}), "sampler": ({"rng": self.rng.bit_generator.state}, {})}
        if self.memory is not None:
            components["memory"] = self.memory.state()
        return components

    def snapshot(self) -> dict:
        """The whole stream state, in memory: `rollback(snapshot)` puts this session back to it
        exactly (the recall benchmark asks every question from the same state). Holds a copy of
        the cells: `sequence_bytes()` bytes."""
        components = self._components()
        # the runtime's cells and logits are fresh arrays; the rest refers to live objects
        return {name: part if name == "runtime" else copy.deepcopy(part) for name, part in components.items()}

    def rollback(self, snapshot: dict) -> None:
        """Return to a state that `snapshot()` took in this session (no checks: it fits)."""
        self.runtime.load_state(*snapshot["runtime"])  # these copy what they keep
        self.cache.load_state(*snapshot["cache"])
        self.transcript.load_state(snapshot["chat"][0])
        self.rng.bit_generator.state = snapshot["sampler"][0]["rng"]
        if self.memory is not None:
            self.memory.load_state(*snapshot["memory"])

    def save(self, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Write the whole stream state to `path` (an .npz file): llama.cpp's cells and last logits,
        the controller's bookkeeping, the chat transcript and the sampler, so that `restore`
        continues exactly. `extra` is JSON-able data of the caller's (a run's progress), returned
        by `load`. The file is replaced atomically."""
        components = self._components()
        if self.memory is not None:
            self.memory.keep_file = True  # the save names it
        path = write_state(path, {"identity": self._identity(), "settings": self._settings(), "extra": extra or {}},
                           components)
        del components  # the copies go before the trim, or their pages stay
        return_freed_memory()
        return path

    def load(self, path: str | os.PathLike) -> dict:
        """Continue the stream saved at `path` in this session (same model, policy and sizes);
        returns the `extra` data saved with it. Everything is checked before anything changes: a
        file that does not fit leaves the session as it was."""
        header, components = read_state(path)
        saved_settings = known_settings(path, header.get("settings", {}), self._settings())
        if "policy" in saved_settings:  # a file older than some option ran with its `absent` value
            saved_settings["policy"] = saved_policy(path, saved_settings["policy"]).config()
        if saved_settings.get("memory"):  # likewise: options added since ran with their defaults
            saved_settings["memory"] = MemoryConfig.from_config(saved_settings["memory"]).config()
        for what, mine, saved in (("identity", self._identity(), header.get("identity", {})),
                                  ("settings", self._settings(), saved_settings)):
            diff = {k: (v, mine.get(k)) for k, v in saved.items() if mine.get(k) != v}
            if diff:
                raise ValueError(f"{path} was saved with other {what}: " +
                                 ", ".join(f"{k}={saved!r} (here {here!r})" for k, (saved, here) in diff.items()))
        missing = {"runtime", "cache", "chat", "sampler"} - set(components)
        if missing:
            raise ValueError(f"{path} lacks the state of {', '.join(sorted(missing))}")
        runtime, cache = components["runtime"], components["cache"]
        chat, sampler = components["chat"][0], components["sampler"][0]
        self.runtime.check_state(*runtime)
        self.cache.check_state(*cache)
        if runtime[0]["n_cells"] != cache[1]["stream_indices"].size:
            raise ValueError(f"{path}: llama.cpp's saved cells ({runtime[0]['n_cells']}) and the stream's "
                             f"({cache[1]['stream_indices'].size}) do not match")
        ChatTranscript.check_state(chat)
        memory = components.get("memory")
        if self.memory is not None and memory is not None:
            self.memory.check_state(*memory)
        try:
            np.random.default_rng().bit_generator.state = sampler.get("rng")
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: the saved sampler state is not valid ({exc})") from None
        self.runtime.load_state(*runtime)  # puts the previous cells back if llama.cpp refuses these
        self.cache.load_state(*cache)
        self.transcript.load_state(chat)
        self.rng.bit_generator.state = sampler["rng"]
        if self.memory is not None:
            if memory is None:
                warnings.warn(f"{path} holds no memory: this session's memory starts empty", stacklevel=2)
                self.memory.reset()
            else:
                self.memory.load_state(*memory)
        del components, runtime, cache  # the file's copies go before the trim, or their pages stay
        return_freed_memory()
        return header.get("extra", {})

    @classmethod
    def restore(cls, path: str | os.PathLike, model: Model | str | os.PathLike | None = None, *,
                n_gpu_layers: int = -1, n_threads: int | None = None,
                mmproj: str | os.PathLike | None = None, view_tokens: int = 0, rpc: Sequence[str] = (),
                **deprecated) -> "StreamSession":
        """A new session continuing the stream saved at `path`, with the settings it was saved with
        (`mmproj` to go on feeding images; the images already in the stream need none). Files saved
        before the cache types were settings ran with f16."""
        view_tokens = renamed_keyword(deprecated, "history", "view_tokens", view_tokens)
        if deprecated:
            raise TypeError(f"restore() got an unexpected keyword argument {next(iter(deprecated))!r}")
        settings = known_settings(path, read_header(path).get("settings", {}), inspect.signature(cls).parameters)
        policy = saved_policy(path, settings.pop("policy"))
        session = cls(model, policy, n_gpu_layers=n_gpu_layers, n_threads=n_threads, mmproj=mmproj,
                      view_tokens=view_tokens, rpc=rpc, **settings)
        try:
            session.load(path)
        except Exception:
            session.close()
            raise
        return session

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

    def feed_image(self, image: ImageLike) -> int:
        """Append an image (a path, its bytes or a PIL image) with the model's image markers; its
        tokens compete with text for the budget. Returns the number of image tokens fed."""
        if self.projector is None:
            raise ValueError("this session has no vision projector: pass mmproj=PATH (--mmproj) to use images")
        chunks = self.projector.encode(image, add_special=self.stats.tokens_seen == 0)
        # the tokens of a non-causal image attend to each other both ways, and an M-RoPE image's
        # share a position that llama.cpp removes at once: one batch must hold them (checked
        # before anything is fed)
        too_big = [(len(c.embeddings), c.non_causal) for c in chunks if isinstance(c, ImageChunk)
                   and (c.non_causal or c.layout is not None)
                   and len(c.embeddings) > (min(self.chunk, self.runtime.n_ubatch) if c.non_causal else self.chunk)]
        if too_big:
            n, non_causal = too_big[0]
            why = "attends over a whole image at once" if non_causal else "lays an image out in 2-D (M-RoPE)"
            raise ValueError(f"this model {why}: its {n} tokens must fit in one batch; raise the chunk (--chunk) "
                             f"to at least {n}")
        n_image = 0
        for c in chunks:
            if isinstance(c, TextChunk):
                self.feed_tokens(c.tokens)
                continue
            if c.non_causal or c.layout is not None:
                self.cache.decode(c.embeddings, causal=not c.non_causal,
                                  layout=None if c.layout is None else (c.layout, c.n_pos))
            else:
                self.cache.feed(c.embeddings, self.chunk)
            n_image += len(c.embeddings)
        return n_image

    def feed_media(self, parts: Iterable[MediaPart]) -> int:
        """Feed text and images in order (e.g. a timestamp before each video frame); returns the
        number of image tokens fed."""
        n_image = 0
        for part in parts:
            if isinstance(part, str):
                self.feed_text(part)
            else:
                n_image += self.feed_image(part)
        return n_image

    def video_parts(self, source: str | os.PathLike, *, fps: float = 1.0, max_frames: int | None = None,
              start: float | None = None, end: float | None = None, progress: bool = True) -> VideoParts:
        """The parts of a video for `feed_media` or `chat_media`, with the cache's occupancy on its
        progress bar. See `infmllm_gguf.video`."""
        def status() -> str:
            st = self.stats
            return f"cache {st.cells_cached}/{self.policy.budget} cells, {st.tokens_seen} tokens seen"
        return VideoParts(source, fps=fps, max_frames=max_frames, start=start, end=end, progress=progress,
                          status=status)

    def feed_video(self, source: str | os.PathLike, *, fps: float = 1.0, max_frames: int | None = None,
                   start: float | None = None, end: float | None = None, progress: bool = True) -> int:
        """Stream a video (a file, an animated GIF or a directory of images) sampled at `fps`, a
        timestamp such as ``[t=00:01:05]`` before each frame, evicting as it goes, so any length fits
        the budget. Returns the number of frames fed."""
        parts = self.video_parts(source, fps=fps, max_frames=max_frames, start=start, end=end, progress=progress)
        self.feed_media(first_checked(parts))
        return parts.frames

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
    def generate(self, prompt: str | None = None, *, max_tokens: int = DEFAULTS.max_tokens,
                 temperature: float = DEFAULTS.temperature, top_p: float = DEFAULTS.top_p, stop: Sequence[str] = (),
                 special: bool = False, sampler: Sampler | None = None,
                 logprobs: int | None = None) -> Iterator[Piece]:
        """Feed `prompt` (if any) now, then return an iterator that samples up to `max_tokens`
        tokens and yields the reply in `Piece`s (text with counts, speeds and, on the last one, an
        empty text and the `finish_reason`).

        `sampler` (logits -> token id) replaces the temperature and top-p sampler. `logprobs`: None,
        or each piece carries its tokens' log-probabilities with that many alternatives. Stops at an
        end-of-generation token or when a `stop` string appears (not yielded); `last_reply` then
        says how many tokens were sampled and why it stopped. While generating, the cache may hold
        up to budget + generation_headroom cells; at the end it is brought back to the budget.
        """
        t0 = time.perf_counter()
        n_prompt = self.feed_prompt(prompt, special=special) if prompt else 0
        prompt_tps = n_prompt / max(time.perf_counter() - t0, 1e-9)
        sampler = sampler or make_sampler(temperature, top_p, self.rng)
        self.last_reply = Reply()
        noting = None if logprobs is None else LogprobSampler(sampler, logprobs)
        return self._pieces(noting or sampler, max_tokens, stop, n_prompt, prompt_tps, noting)

    def _pieces(self, sampler: Sampler, max_tokens: int, stop: Sequence[str], n_prompt: int,
                prompt_tps: float, noting: LogprobSampler | None) -> Iterator[Piece]:
        reply, last, noted = self.last_reply, [None], []

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
        tokens = generate_tokens(self.cache, sampler, max_tokens=max_tokens, is_end=self.model.is_end_of_generation,
                                 reply=reply)
        try:
            for text in text_pieces(tokens_seen(), StreamingDetokenizer(self.model.token_bytes), stop):
                yield piece(text, None)
        finally:
            tokens.close()
            if self.cache.n_cached > self.policy.budget:
                self.cache.evict()
        yield piece("", reply.finish_reason)

    # -- chat -------------------------------------------------------------------------------
    def chat_template(self) -> str:
        """The model's chat template; ValueError if it has none."""
        template = self.model.chat_template()
        if template is None:
            raise ValueError(f"{self.model.name} has no chat template; use generate() instead")
        return template

    def chat(self, message: str, *, media: Iterable[MediaPart] | None = None, system: str | None = None,
             max_tokens: int = DEFAULTS.max_tokens, temperature: float = DEFAULTS.temperature,
             top_p: float = DEFAULTS.top_p) -> str:
        """Add a user turn (with `media`, if any, where the template puts them) and return the
        model's reply, generated into the same stream (the reply's end marker is fed at the next turn)."""
        return "".join(self.chat_stream(message, media=media, system=system, max_tokens=max_tokens,
                                        temperature=temperature, top_p=top_p))

    def chat_stream(self, message: str, *, media: Iterable[MediaPart] | None = None, system: str | None = None,
                    max_tokens: int = DEFAULTS.max_tokens, temperature: float = DEFAULTS.temperature,
                    top_p: float = DEFAULTS.top_p, stop: Sequence[str] = (),
                    sampler: Sampler | None = None, logprobs: int | None = None) -> Iterator[Piece]:
        """`chat`, the user turn fed now, the reply yielded in `Piece`s as it is sampled (`stop`,
        `sampler` and `logprobs` as in `generate`)."""
        self.user_turn(message, media=media, system=system)
        return self._reply(self.generate(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                         sampler=sampler, logprobs=logprobs))

    def _reply(self, pieces: Iterator[Piece]) -> Iterator[Piece]:
        reply = ""
        try:
            for piece in pieces:
                reply += piece
                yield piece
        finally:  # a reply cut short (the caller stopped reading) is still part of the conversation
            pieces.close()
            self.transcript.reply(reply)

    def chat_media(self, media: Iterable[MediaPart], *, system: str | None = None) -> int:
        """A user turn that only shows media (an image, a video's frames), with no reply: the next
        `chat` asks about it. Returns the number of image tokens fed."""
        return self.user_turn("", media=media, system=system, add_assistant=False)

    def read_turns(self, turns: Sequence[tuple[str, str, Sequence[MediaPart]]], system: str | None = None) -> None:
        """Feed a conversation's messages that this stream has not read, without sampling: each
        (role, text, media) user message, and the assistant's answer to it where one follows."""
        i = 0
        while i < len(turns):
            answered = i + 1 < len(turns) and turns[i + 1][0] == "assistant"
            role, text, media = turns[i]
            if role != "user":
                raise ValueError(f"message {i} of the history is the {role}'s: an assistant message follows a user one")
            self.user_turn(text, media=list(media) or None, system=system, add_assistant=answered)
            if answered:
                self.assistant_turn(turns[i + 1][1])
            i += 2 if answered else 1
            system = None

    def assistant_turn(self, text: str) -> int:
        """Feed an assistant message that was not generated here (a conversation's history, replayed)
        as the reply to the last user turn; returns the number of tokens fed."""
        n = self.feed_text(text)
        self.transcript.reply(text)
        return n

    def user_turn(self, message: str, *, media: Iterable[MediaPart] | None = None, system: str | None = None,
                  add_assistant: bool = True) -> int:
        """Add a user message (`system` too, at the start of a conversation) and feed the new part
        of the rendered conversation, up to the assistant's turn when `add_assistant`; `media` go
        where the message's media marker renders. Returns the number of image tokens fed."""
        self.chat_template()
        if media is None:
            new = self.transcript.user_turn(message, system=system, add_assistant=add_assistant)
            self.feed_prompt(new, special=True, query=message)
            self.transcript.record_fed(new)
            return 0
        if self.projector is None:
            raise ValueError("media in a chat turn need a vision projector: pass mmproj=PATH (--mmproj)")
        marker = self.projector.marker
        if marker in message:
            raise ValueError(f"messages cannot contain {marker!r}: it marks where media go")
        parts = first_checked(media)  # a source with no frames fails before any change
        before_turn = self.transcript.state()
        new = self.transcript.user_turn(marker + ("\n" + message if message else ""), system=system,
                                        add_assistant=add_assistant)
        head, found, tail = new.rpartition(marker)  # this turn's marker is the last one
        if not found:
            self.transcript.load_state(before_turn)
            raise ValueError("the chat template dropped the media marker from the message")
        self.feed_prompt(head.replace(marker, ""), special=True, query=message)  # an earlier marker: media already fed
        # once the media start, the stream holds the turn up to its marker, even if a frame fails
        self.transcript.record_fed(head + marker)
        n_image = self.feed_media(parts)
        self.feed_text(tail, special=True)
        self.transcript.record_fed(tail)
        return n_image
