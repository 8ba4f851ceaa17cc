"""`Llama`: llama-cpp-python's class of the same name, over a bounded `StreamSession`, so that code
written for llama-cpp-python switches by changing one import and never runs out of context.

    from infmllm_gguf import Llama        # was: from llama_cpp import Llama
    llm = Llama(model_path="model.gguf", n_ctx=2048)
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hello"}])

The constructor, `create_completion` (and `__call__`), `create_chat_completion`, `tokenize`,
`detokenize` and `n_ctx` take llama-cpp-python's arguments and return its dicts and stream chunks.
`n_ctx` becomes the cache's budget: where llama-cpp-python raises "Requested tokens (N) exceed
context window of M", this one evicts with the policy (`policy=`, default inf-mllm) and keeps what
it evicts in its memory (`memory=`, on by default). Chats are rendered as llama-cpp-python renders
them: the GGUF's Jinja template through its formatter (llama.cpp's own engine, which the rest of
this package uses as llama-server does without --jinja, leaves out what some templates add, such
as SmolLM2's default system message). Like llama-cpp-python, a prompt that extends the
previous prompt and reply (a chat resent with its history) reads only its new part; any other
starts the stream again.

Sampling: temperature, top_p, top_k, min_p and seed as llama-cpp-python reads them, and `logprobs`
(completions) or `logprobs` with `top_logprobs` (chat) in its format; options this
class does not implement (penalties, grammars, logit biases, tools) are refused with ValueError when
set to anything but their defaults, never ignored.
"""
from __future__ import annotations

import json
import uuid
from typing import Iterator, Sequence

from .generation import Piece, TokenLogprob, make_sampler
from .memory import MemoryConfig
from .openai_format import (InvalidRequest, chain, chat_from_completion_logprobs, check_roles, completion_logprobs,
                            delta_choice, head, message_choice, refuse_unsupported, request_rng, role_chunk,
                            text_choice, usage)
from .session import StreamSession

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama-cpp-python's: a random seed

#: llama-cpp-python's constructor options about speed, memory mapping or logging: accepted, no effect here
IGNORED_OPTIONS = {"n_batch", "n_ubatch", "n_threads_batch", "use_mmap", "use_mlock", "main_gpu", "split_mode",
                   "offload_kqv", "numa", "last_n_tokens_size", "verbose", "logits_all"}

#: sampling options of llama-cpp-python that this class does not implement, with their defaults
UNSUPPORTED = {"suffix": None, "echo": False, "frequency_penalty": 0.0, "presence_penalty": 0.0,
               "repeat_penalty": 1.0, "typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0,
               "stopping_criteria": None, "logits_processor": None, "grammar": None,
               "logit_bias": None, "functions": None, "function_call": None, "tools": None, "tool_choice": None,
               "response_format": None}


def _message_part(message: dict) -> bytes:
    """What identifies a message in the chain of digests of the messages the stream holds."""
    return json.dumps([message.get("role"), message.get("content")]).encode()


class Llama:
    """See the module. Extra keywords: `policy` (a name or `Policy`), `memory` (a `MemoryConfig`,
    True or False), `chunk` (tokens per decode)."""

    def __init__(self, model_path: str, *, n_ctx: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0,
                 seed: int = LLAMA_DEFAULT_SEED, flash_attn: bool = False, chat_format: str | None = None,
                 policy: str = "inf-mllm", memory: MemoryConfig | bool = True, chunk: int = 256, **options):
        unknown = sorted(set(options) - IGNORED_OPTIONS)
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r} (this Llama takes llama-cpp-python's "
                            "model_path, n_ctx, n_threads, n_gpu_layers, seed, flash_attn and ignores "
                            f"{', '.join(sorted(IGNORED_OPTIONS))})")
        if chat_format is not None:
            raise ValueError("chat_format: this Llama always uses the model's own chat template (leave it None)")
        self.model_path = str(model_path)
        self._session = StreamSession(model_path, policy, budget=n_ctx, chunk=min(chunk, n_ctx),
                                      n_gpu_layers=n_gpu_layers, n_threads=n_threads, flash_attn=flash_attn,
                                      seed=None if seed == LLAMA_DEFAULT_SEED else seed,
                                      memory=memory)
        if self._session.model.chat_template() is not None:
            self._session.render_chats_with(self._session.model.render_chat_jinja)
        self._held_text = ""      # the completion text the stream holds (prompts and replies)
        self._held_chat: list[str] = []  # digests of the chat messages it holds, in order

    # -- llama-cpp-python's small methods ---------------------------------------------------
    def n_ctx(self) -> int:
        return self._session.policy.budget

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._session.model.tokenize(text.decode("utf-8", errors="replace"), add_special=add_bos,
                                            parse_special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = False) -> bytes:
        return b"".join(self._session.model.token_bytes(t) for t in tokens)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- completions -------------------------------------------------------------------------
    def __call__(self, prompt: str, **options):
        return self.create_completion(prompt, **options)

    def create_completion(self, prompt: str, max_tokens: int | None = 16, temperature: float = 0.8,
                          top_p: float = 0.95, min_p: float = 0.05, stop: str | list[str] | None = None,
                          top_k: int = 40, stream: bool = False, seed: int | None = None, model: str | None = None,
                          logprobs: int | None = None, **options):
        """Text after `prompt`: a `text_completion` dict, or an iterator of its chunks (`stream`)."""
        refuse_options(options)
        if not isinstance(prompt, str):
            raise ValueError("prompt: this Llama takes text (token-id prompts are not supported)")
        session = self._session
        if self._held_chat or not prompt.startswith(self._held_text) or not self._held_text:
            session.reset()  # not a continuation of what the stream holds: read the prompt from the start
            self._held_chat, self._held_text = [], ""
        new = prompt[len(self._held_text):]
        n_prompt = len(session.model.tokenize(prompt, add_special=True))
        pieces = session.generate(new, **self._sampling(max_tokens, temperature, top_p, top_k, min_p, stop, seed,
                                                        logprobs))
        top = head(f"cmpl-{uuid.uuid4()}", "text_completion", model or self.model_path)
        offsets = TextOffsets(len(prompt))

        def remember(text: str) -> None:
            self._held_text = prompt + text

        def choice(text: str, finish: str | None, noted: Sequence[TokenLogprob] | None) -> dict:
            return text_choice(text, finish, self._completion_logprobs(noted, offsets))
        if stream:
            return self._stream(pieces, top, choice, remember)
        text, noted = self._join(pieces)
        remember(text)
        reply = session.last_reply
        return {**top, "choices": [choice(text, reply.finish_reason, noted)],
                "usage": usage(n_prompt, reply.n_tokens)}

    def create_chat_completion(self, messages: list[dict], temperature: float = 0.2, top_p: float = 0.95,
                               top_k: int = 40, min_p: float = 0.05, stream: bool = False,
                               stop: str | list[str] | None = None, seed: int | None = None,
                               max_tokens: int | None = None, model: str | None = None, logprobs: bool | None = None,
                               top_logprobs: int | None = None, **options):
        """The assistant's reply to `messages`: a `chat.completion` dict, or an iterator of
        `chat.completion.chunk` dicts (`stream`)."""
        refuse_options(options)
        turns = checked_messages(messages)
        session = self._session
        digests = chain(map(_message_part, messages))
        held = len(self._held_chat)
        if self._held_text or not held or held >= len(messages) or self._held_chat != digests[1:held + 1]:
            session.reset()  # not a continuation of what the stream holds: read the whole conversation
            self._held_chat, self._held_text, held = [], "", 0
        system = turns[0][1] if turns[0][0] == "system" and held == 0 else None
        new = turns[held:]
        if new and new[0][0] == "system":
            new = new[1:]
        session.read_turns(new[:-1], system)
        top = top_logprobs if logprobs else None  # as llama-cpp-python: logprobs alone asks for none
        pieces = session.chat_stream(new[-1][1], system=system if len(new) == 1 else None,
                                     **self._sampling(max_tokens, temperature, top_p, top_k, min_p, stop, seed, top))
        rid, name = f"chatcmpl-{uuid.uuid4()}", model or self.model_path
        offsets = TextOffsets(0)

        def remember(text: str) -> None:
            self._held_chat = digests[1:] + chain([_message_part({"role": "assistant", "content": text})],
                                                  digests[-1])[1:]

        def chat_logprobs(noted: Sequence[TokenLogprob] | None) -> dict | None:
            return chat_from_completion_logprobs(self._completion_logprobs(noted, offsets))

        def choice(text: str, finish: str | None, noted: Sequence[TokenLogprob] | None) -> dict:
            return delta_choice(text if finish is None else None, finish, chat_logprobs(noted))
        if stream:
            chunk_head = head(rid, "chat.completion.chunk", name)
            return self._stream(pieces, chunk_head, choice, remember, first=role_chunk(chunk_head))
        text, noted = self._join(pieces)
        remember(text)
        reply = session.last_reply
        return {**head(rid, "chat.completion", name),
                "choices": [message_choice(text, reply.finish_reason, chat_logprobs(noted))],
                # the whole conversation read so far, as llama-cpp-python counts its prompt
                "usage": usage(session.stats.tokens_seen - reply.n_tokens, reply.n_tokens)}

    # -- shared ------------------------------------------------------------------------------
    def _sampling(self, max_tokens, temperature, top_p, top_k, min_p, stop, seed, logprobs) -> dict:
        rng = request_rng(seed, self._session.rng)  # a negative seed: a random one, as llama-cpp-python's -1
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        limit = max_tokens if max_tokens is not None and max_tokens > 0 else self.n_ctx()  # as llama-cpp-python
        return {"max_tokens": limit, "stop": stops, "logprobs": logprobs,
                "sampler": make_sampler(temperature, top_p, rng, top_k=top_k, min_p=min_p)}

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


def refuse_options(options: dict) -> None:
    """TypeError for an option llama-cpp-python does not have; ValueError (`InvalidRequest`) for one
    of its options that this class does not implement, set to anything but its default."""
    unknown = next((name for name in options if name not in UNSUPPORTED), None)
    if unknown is not None:
        raise TypeError(f"unexpected keyword argument {unknown!r}")
    refuse_unsupported(options, UNSUPPORTED, lambda name, value: f"{name}={value!r}: this Llama does not implement "
                                                                  f"{name} (leave it at its default)")


def checked_messages(messages: list[dict]) -> list[tuple[str, str, list]]:
    """(role, text, media) of each message: text content only, a system message first, the last
    message the user's."""
    turns = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}]: a system, user or assistant message with text content is needed "
                                 f"(got role {role!r}, content of type {type(content).__name__})",
                                 param=f"messages[{i}]")
        turns.append((role, content, []))
    check_roles([role for role, _, _ in turns], assistant_answers_user=False)  # llama-cpp-python renders any order
    return turns
