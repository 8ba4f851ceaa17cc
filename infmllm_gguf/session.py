"""`StreamSession`: stream text (and chat rounds) into a model through a KV cache of fixed size."""
from __future__ import annotations

import ctypes
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
from llama_cpp import llama_cpp as llama

from .cache import CacheController, CacheStats
from .policies import make_policy
from .runtime import Runtime

if TYPE_CHECKING:  # imported when used: text-only sessions do not load libmtmd
    from .multimodal import ImageLike, MediaPart

STATE_VERSION = 1

try:  # glibc: see `return_freed_memory`
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


def return_freed_memory() -> None:
    """Hand the heap pages freed by a save back to the OS. glibc keeps them, and a stream's
    resident size stepped up by 11-34 MiB at its first checkpoints (the copies of the state);
    with this it stays flat. A no-op where the C library is not glibc."""
    if _malloc_trim is not None:
        _malloc_trim(0)


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


class StreamSession:
    """A model reading an endless stream in `budget` cells, evicting with `policy`.

    Options left at None take the policy's defaults (see `infmllm_gguf.policies`; settings other than
    the common ones named here go in `policy_options`, e.g. ``layer_reduce="max"``). The llama.cpp
    context holds `budget + max(chunk, generation_headroom)` cells and never grows. `mmproj`, the
    model's vision projector GGUF, enables `feed_image`, `feed_video` and media in `chat`.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, budget: int = 1024,
                 policy: str = "inf-mllm", recent: int | None = None, window: int | None = None,
                 bias: float | None = None, sinks: int | None = None, decay: float | None = None,
                 n_keep: int | None = None, chunk: int = 256, generation_headroom: int = 32,
                 n_gpu_layers: int = -1, n_threads: int | None = None, flash_attn: bool | None = None,
                 seed: int = 0, mmproj: str | os.PathLike | None = None, **policy_options):
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 token (got {chunk}): pass --chunk N")
        if window is not None and window > chunk:
            raise ValueError(f"window ({window}) must not exceed chunk ({chunk}): lower --window or raise --chunk")
        self.policy = make_policy(policy, budget=budget, recent=recent, window=window, bias=bias,
                                  sinks=sinks, decay=decay, n_keep=n_keep, **policy_options)
        self.chunk = chunk
        self.generation_headroom = generation_headroom
        self.flash_attn = flash_attn
        self.runtime = Runtime(model_path, n_ctx=budget + max(chunk, generation_headroom), n_batch=chunk,
                               n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, n_threads=n_threads)
        self.cache = CacheController(self.runtime, self.policy, generation_headroom=generation_headroom)
        self.projector = None
        if mmproj is not None:
            from .multimodal import Projector

            try:
                self.projector = Projector(mmproj, self.runtime, use_gpu=n_gpu_layers != 0, n_threads=n_threads)
            except Exception:
                self.runtime.close()
                raise
        self.rng = np.random.default_rng(seed)
        self._chat_messages: list[tuple[str, str]] = []
        self._chat_fed = ""

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        if self.projector is not None:
            self.projector.close()
        self.runtime.close()

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the stream: empty cache, counters at zero, no chat history."""
        self.cache.reset()
        self._chat_messages.clear()
        self._chat_fed = ""

    # -- state ------------------------------------------------------------------------------
    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    def cached_positions(self) -> np.ndarray:
        """Stream indices (original token numbers) of the cells cached now, ascending."""
        return self.cache.ids.copy()

    # -- saving -----------------------------------------------------------------------------
    def _identity(self) -> dict:
        rt = self.runtime
        return {"model": rt.model_path.name, "model_bytes": rt.model_path.stat().st_size, "n_vocab": rt.n_vocab,
                "n_layer": rt.n_layer, "n_embd": rt.n_embd, "n_ctx": rt.n_ctx}

    def _settings(self) -> dict:
        options = {f.name: getattr(self.policy, f.name) for f in fields(self.policy) if f.init}
        return {"policy": self.policy.name, **options, "chunk": self.chunk,
                "generation_headroom": self.generation_headroom, "flash_attn": self.flash_attn}

    def save(self, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Write the whole stream state to `path` (an .npz file): llama.cpp's cells and last logits,
        the controller's bookkeeping, the chat history and the sampler, so that `restore` continues
        exactly. `extra` is JSON-able data of the caller's (a run's progress), returned by `load`.
        The file is replaced atomically: a crash mid-save leaves the previous one intact."""
        path = Path(path)
        meta, arrays = self.cache.state_dict()
        meta.update(version=STATE_VERSION, identity=self._identity(), settings=self._settings(),
                    chat_messages=self._chat_messages, chat_fed=self._chat_fed,
                    rng=self.rng.bit_generator.state, extra=extra or {})
        llama_state, last_logits = self.runtime.get_state()
        if last_logits is not None:
            arrays["last_logits"] = last_logits
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), llama_state=llama_state,
                     **{f"cache_{k}": v for k, v in arrays.items()})
        os.replace(tmp, path)
        del llama_state  # the copy goes before the trim, or its pages stay
        return_freed_memory()
        return path

    @staticmethod
    def read_state(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
        """The metadata and arrays of a file written by `save`; ValueError when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved session at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(arrays.pop("meta").tobytes())
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a session saved by infmllm-gguf ({exc})") from None
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"{path} was saved in state format {meta.get('version')}, this version reads "
                             f"{STATE_VERSION}")
        return meta, arrays

    def load(self, path: str | os.PathLike) -> dict:
        """Continue the stream saved at `path` in this session (same model, policy and sizes);
        returns the `extra` data saved with it."""
        meta, arrays = self.read_state(path)
        for what, mine in (("identity", self._identity()), ("settings", self._settings())):
            diff = {k: (v, mine.get(k)) for k, v in meta[what].items() if mine.get(k) != v}
            if diff:
                raise ValueError(f"{path} was saved with other {what}: " +
                                 ", ".join(f"{k}={saved!r} (here {here!r})" for k, (saved, here) in diff.items()))
        self.runtime.set_state(arrays.pop("llama_state"), arrays.pop("cache_last_logits", None))
        self.cache.load_state_dict(meta, {k.removeprefix("cache_"): v for k, v in arrays.items()})
        self._chat_messages = [tuple(m) for m in meta["chat_messages"]]
        self._chat_fed = meta["chat_fed"]
        self.rng.bit_generator.state = meta["rng"]
        return meta["extra"]

    @classmethod
    def restore(cls, path: str | os.PathLike, model_path: str | os.PathLike | None = None, *,
                n_gpu_layers: int = -1, n_threads: int | None = None,
                mmproj: str | os.PathLike | None = None) -> "StreamSession":
        """A new session continuing the stream saved at `path`, with the settings it was saved with
        (`mmproj` to go on feeding images; the images already in the stream need none)."""
        meta, _ = cls.read_state(path)
        settings = dict(meta["settings"])
        session = cls(model_path, policy=settings.pop("policy"), n_gpu_layers=n_gpu_layers, n_threads=n_threads,
                      mmproj=mmproj, **settings)
        try:
            session.load(path)
        except Exception:
            session.close()
            raise
        return session

    # -- feeding ----------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Tokens of `text`; BOS only at the very start of the stream."""
        return self.runtime.tokenize(text, add_special=self.cache.stats.tokens_seen == 0, parse_special=special)

    def feed_text(self, text: str, *, special: bool = False) -> int:
        return self.feed_tokens(self.tokenize(text, special=special))

    def feed_tokens(self, ids: Sequence[int]) -> int:
        """Append tokens to the stream in chunks, evicting as needed; returns how many were fed."""
        ids = list(ids)
        for i in range(0, len(ids), self.chunk):
            self.cache.decode(ids[i:i + self.chunk], logits="last")
        return len(ids)

    def feed_image(self, image: "ImageLike") -> int:
        """Append an image (a path, its bytes or a PIL image) with the model's image markers; its
        tokens compete with text for the budget. Returns the number of image tokens fed."""
        from .multimodal import feed_image

        return feed_image(self, image)

    def feed_video(self, source: str | os.PathLike, *, fps: float = 1.0, max_frames: int | None = None,
                   start: float | None = None, end: float | None = None, progress: bool = True) -> int:
        """Stream a video (a file, an animated GIF or a directory of images) sampled at `fps`, a
        timestamp such as ``[t=00:01:05]`` before each frame, evicting as it goes, so any length fits
        the budget. Returns the number of frames fed. See `infmllm_gguf.video`."""
        from .video import feed_video

        return feed_video(self, source, fps=fps, max_frames=max_frames, start=start, end=end, progress=progress)

    def token_nll(self, ids: Sequence[int]) -> np.ndarray:
        """Feed `ids` and return the negative log-likelihood of each token given the stream before
        it, as the bounded cache sees it (float64[len(ids)]; one fewer when the stream starts here,
        since its first token has nothing to be predicted from)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = []
        if self.cache.stats.tokens_seen and ids.size:
            out.append(nll_of(self.runtime.logits()[None], ids[:1]))
        for i in range(0, ids.size, self.chunk):
            piece = ids[i:i + self.chunk]
            self.cache.decode(piece.tolist(), logits="all")
            logits = self.runtime.all_logits(piece.size)
            out.append(nll_of(logits[:-1], piece[1:]))
            if i + self.chunk < ids.size:
                out.append(nll_of(logits[-1:], ids[i + self.chunk:i + self.chunk + 1]))
        return np.concatenate(out) if out else np.zeros(0)

    # -- generation -------------------------------------------------------------------------
    def sample(self, logits: np.ndarray, temperature: float, top_p: float) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        p = np.exp(log_softmax(logits / temperature))
        order = np.argsort(-p)
        cut = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
        top = order[:cut]
        return int(self.rng.choice(top, p=p[top] / p[top].sum()))

    def generate(self, prompt: str | None = None, *, max_tokens: int = 128, temperature: float = 0.7,
                 top_p: float = 0.95, stop: Sequence[str] = (), special: bool = False) -> Iterator[str]:
        """Feed `prompt` (if any), then sample up to `max_tokens` tokens, yielding text pieces.

        Stops at an end-of-generation token or when a `stop` string appears (not yielded). While
        generating, the cache may hold up to budget + generation_headroom cells; at the end it is
        brought back to the budget.
        """
        try:
            yield from self._generate(prompt, max_tokens, temperature, top_p, stop, special)
        finally:
            if self.cache.n_cached > self.policy.budget:
                self.cache.evict()

    def _generate(self, prompt, max_tokens, temperature, top_p, stop, special) -> Iterator[str]:
        if prompt:
            self.feed_text(prompt, special=special)
        if self.cache.n_cached == 0:
            raise ValueError("nothing to continue: feed text or pass a prompt first")
        text = ""
        emitted = 0
        logits = self.runtime.logits()
        for _ in range(max_tokens):
            tok = self.sample(logits, temperature, top_p)
            if llama.llama_vocab_is_eog(self.runtime.vocab, tok):
                break
            self.cache.decode([tok], logits="last", generating=True)
            logits = self.runtime.logits()
            text += self.runtime.token_piece(tok)
            hit = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if hit >= 0:
                if hit > emitted:
                    yield text[emitted:hit]
                return
            # hold back what could still become a stop string
            safe = len(text) - max((len(s) - 1 for s in stop), default=0)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        if len(text) > emitted:
            yield text[emitted:]

    # -- chat -------------------------------------------------------------------------------
    def chat_template(self) -> str:
        tmpl = llama.llama_model_chat_template(self.runtime.model, None)
        if not tmpl:
            raise ValueError(f"{self.runtime.model_path.name} has no chat template; use generate() instead")
        return tmpl.decode("utf-8")

    def _format(self, messages: list[tuple[str, str]], add_assistant: bool) -> str:
        arr = (llama.llama_chat_message * len(messages))(
            *[llama.llama_chat_message(role.encode(), content.encode()) for role, content in messages])
        tmpl = self.chat_template().encode()
        size = 2 * sum(len(c) + len(r) for r, c in messages) + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama.llama_chat_apply_template(tmpl, arr, len(messages), add_assistant, buf, size)
            if n < 0:
                raise ValueError("llama.cpp does not support this model's chat template")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n
        raise RuntimeError("chat template output kept growing")

    def chat(self, message: str, *, media: Iterable["MediaPart"] | None = None, system: str | None = None,
             max_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.95) -> str:
        """One round through the model's chat template; the conversation stays in the stream.
        `media`: images (paths as `Path`, bytes, PIL images) and text (`str`, e.g. timestamps),
        shown in the user turn before `message`."""
        return "".join(self.chat_stream(message, media=media, system=system, max_tokens=max_tokens,
                                        temperature=temperature, top_p=top_p))

    def chat_stream(self, message: str, *, media: Iterable["MediaPart"] | None = None, system: str | None = None,
                    max_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.95) -> Iterator[str]:
        """`chat`, yielding the reply in pieces as it is sampled."""
        self._user_turn(message, media, system, add_assistant=True)
        reply = ""
        try:
            for piece in self.generate(max_tokens=max_tokens, temperature=temperature, top_p=top_p):
                reply += piece
                yield piece
        finally:  # a reply cut short (the caller stopped reading) is still part of the conversation
            self._chat_messages.append(("assistant", reply))
            self._chat_fed += reply

    def chat_media(self, media: Iterable["MediaPart"], *, system: str | None = None) -> int:
        """A user turn that only shows media (an image, a video's frames), with no reply: the next
        `chat` asks about it. Returns the number of image tokens fed."""
        return self._user_turn("", media, system, add_assistant=False)

    def _user_turn(self, message: str, media: Iterable["MediaPart"] | None, system: str | None,
                   add_assistant: bool) -> int:
        """Add a user message and feed what the stream has not seen of the rendered conversation;
        the media go where the message's media marker renders."""
        from .multimodal import MEDIA_MARKER, feed_media, peek

        if MEDIA_MARKER in message:
            raise ValueError(f"messages cannot contain {MEDIA_MARKER!r}: it marks where media go")
        parts = peek(media) if media is not None else None  # a source with no frames fails before any change
        if system is not None and not self._chat_messages:
            self._chat_messages.append(("system", system))
        content = message if parts is None else MEDIA_MARKER + ("\n" + message if message else "")
        self._chat_messages.append(("user", content))
        full = self._format(self._chat_messages, add_assistant=add_assistant)
        # feed only what the stream has not seen; templates render earlier turns identically
        new = full[len(os.path.commonprefix([full, self._chat_fed])):]
        if parts is None:
            self.feed_text(new, special=True)
            self._chat_fed = full
            return 0
        # this turn's marker is the last one; any earlier one belongs to a re-rendered turn whose media are fed
        before, marker, after = new.rpartition(MEDIA_MARKER)
        if not marker:
            raise ValueError("the chat template dropped the media marker from the message")
        self.feed_text(before.replace(MEDIA_MARKER, ""), special=True)
        # once the media start, the stream holds the turn up to its marker, even if a frame fails
        self._chat_fed = full[:len(full) - len(after)]
        n_image = feed_media(self, parts)
        self.feed_text(after, special=True)
        self._chat_fed = full
        return n_image
