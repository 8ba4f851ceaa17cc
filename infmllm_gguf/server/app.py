"""The OpenAI-compatible HTTP server (FastAPI): chat and text completions streamed or not, models,
health, Prometheus metrics, a session view and the web page, over a `ConversationStore`."""
from __future__ import annotations

import asyncio
import copy
import json
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import AsyncIterator, Callable, NamedTuple

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..generation import TokenLogprob, make_sampler
from ..probes import rss_mib
from ..session import StreamSession
from .api import ApiError, ChatRequest, CompletionRequest, Turn, chain, checked_turns, error_from_validation
from .conversations import Busy, Conversation, ConversationStore, read_history
from .journal import turn_to_json
from .limits import Limits

STATIC = Path(__file__).parent / "static"


@dataclass
class Metrics:
    """The server's counters, changed from request threads and read by /metrics: under a lock."""
    requests: dict = field(default_factory=dict)
    tokens_in: int = 0
    tokens_out: int = 0
    evictions: int = 0
    cells_evicted: int = 0
    refused: int = 0
    timeouts: int = 0
    tokens_recalled: int = 0   # re-read from the memory tier before prompts
    recall_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, route: str) -> None:
        with self.lock:
            self.requests[route] = self.requests.get(route, 0) + 1

    def add(self, **amounts) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict:
        with self.lock:
            return {f.name: copy.copy(getattr(self, f.name)) for f in fields(self) if f.name != "lock"}


class RequestTimeout(ApiError):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request ran past this server's limit of {seconds:g} s (serve --request-timeout); "
                              "the conversation is as it was before it", code="timeout")


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused (413) before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.refuse(scope, receive, send)
        chunks, size = [], 0
        while True:  # the body is read whole here anyway (JSON): counted as it comes
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        body, given = b"".join(chunks), False

        async def replay():
            nonlocal given
            if given:
                return await receive()  # a disconnect, for streamed replies
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send):
        err = ApiError(413, f"the request body is over this server's limit of {self.max_bytes} bytes "
                            "(serve --max-body-mib)", code="body_too_large")
        await JSONResponse(err.body(), status_code=413)(scope, receive, send)


class Chunk(NamedTuple):
    """A piece of a streamed reply: its text and, when asked for, its tokens' logprobs entries."""
    text: str
    logprobs: list[dict] | None


def openai_logprobs(logprobs: tuple[TokenLogprob, ...], token_bytes: Callable[[int], bytes]) -> list[dict]:
    """Chat completions' `logprobs.content`: one entry per token, with its text, bytes and alternatives."""
    def entry(token: int, logprob: float) -> dict:
        data = token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}
    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in logprobs]


def completion_logprobs(content: list[dict], offset: int = 0) -> dict:
    """Legacy completions' `logprobs` from chat's entries, text offsets counted from `offset`."""
    offsets, at = [], offset
    for c in content:
        offsets.append(at)
        at += len(c["token"])
    return {"tokens": [c["token"] for c in content], "token_logprobs": [c["logprob"] for c in content],
            "top_logprobs": [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content],
            "text_offset": offsets}


def create_app(store: ConversationStore, *, model_name: str, api_key: str | None = None,
               per_session_mib: float | None = None, limits: Limits = Limits()) -> FastAPI:
    metrics = Metrics()
    started = time.time()
    # one thread per admitted request at most: requests beyond are refused before they get here
    workers = ThreadPoolExecutor(max_workers=store.parallel + store.queue, thread_name_prefix="request")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store.start_snapshots()
        yield
        workers.shutdown(wait=True)  # the requests in flight finish first
        await run_in_threadpool(store.save_all)  # a restarted server continues every conversation

    app = FastAPI(title="infmllm-gguf", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            err = ApiError(400, "the request body is not valid JSON", code="invalid_json")
        else:
            err = error_from_validation(errors)
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key is not None and request.url.path not in ("/health", "/") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            err = ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", kind="authentication_error",
                           code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    def memory_counters(session: StreamSession) -> tuple[int, float]:
        """Tokens the memory re-read and its seconds so far (zeros without a memory)."""
        if session.memory is None:
            return 0, 0.0
        st = session.memory.stats
        return st.tokens_recalled, st.recall_s

    # -- the work of one request, in a worker thread ----------------------------------------
    def prompt_tokens(session: StreamSession, texts: list[str]) -> int:
        n = sum(len(session.model.tokenize(t, add_special=False, parse_special=False)) for t in texts)
        if n > limits.max_prompt_tokens:
            raise ApiError(400, f"the request's new messages are {n} tokens; this server reads at most "
                                f"{limits.max_prompt_tokens} per request (serve --max-prompt-tokens): send them "
                                "in several requests", param="messages", code="prompt_too_long")
        return n

    def run_turns(conv: Conversation, turns: list[Turn], held: int, body, emit: Callable[[Chunk], None],
                  cancelled: threading.Event, deadline: float, kept: bool) -> dict:
        """Feed what the stream has not read of the request (its new messages, or a completion's
        prompt), generate the reply and hand each piece to `emit`; a conversation that is `kept`
        has the request logged before this returns. Fails without changing the conversation."""
        completion = isinstance(body, CompletionRequest)
        new = turns[held:]
        max_tokens = body.reply_tokens(limits.max_tokens)
        session = store.live(conv)
        prompt_tokens(session, [body.prompt] if completion else [t.text for t in new])
        st = session.stats
        before, evictions_before, evicted_before = st.tokens_seen, st.evictions, st.cells_evicted
        memory_before = memory_counters(session)
        rng = np.random.default_rng(body.seed) if body.seed is not None else session.rng
        sampler = make_sampler(body.temperature, body.top_p, rng)
        top = body.logprobs if completion else (body.top_logprobs or 0) if body.logprobs else None
        options = dict(max_tokens=max_tokens, stop=body.stops(), sampler=sampler, logprobs=top)
        text, finish, content = "", None, None if top is None else []
        try:
            if completion:
                pieces = session.generate(body.prompt, **options)
            else:
                system = new[0].text if new[0].role == "system" else None
                history = new[1:-1] if system is not None else new[:-1]
                read_history(session, history, system)
                pieces = session.chat_stream(new[-1].text, media=list(new[-1].images) or None,
                                             system=None if history else system, **options)
            try:
                for piece in pieces:
                    finish = piece.finish_reason
                    if finish is not None:
                        break  # the last piece: no text, logprobs of a stop string's tokens at most
                    entries = None if top is None else openai_logprobs(piece.logprobs, session.model.token_bytes)
                    if content is not None:
                        content += entries
                    text += piece
                    emit(Chunk(piece, entries))
                    if cancelled.is_set():
                        break  # a client that left: the reply so far stays in the conversation
                    if time.monotonic() > deadline:
                        raise RequestTimeout(limits.timeout_s)
            finally:
                pieces.close()
            if completion:
                fed = [Turn("user", body.prompt + text)]
                entry = {"kind": "completion", "prompt": body.prompt, "reply": text}
            else:
                fed = new + [Turn("assistant", text)]
                entry = {"kind": "chat", "turns": [turn_to_json(t) for t in new], "reply": text}
            store.record(conv, chain(fed, start=conv.digest)[-1], conv.n_messages + len(fed), entry if kept else None)
        except BaseException:
            store.rollback(conv)  # back to its last completed request, on disk
            raise
        reply, st = session.last_reply, session.stats
        recalled, recall_s = (after - b for after, b in zip(memory_counters(session), memory_before))
        usage = {"prompt_tokens": st.tokens_seen - before - reply.n_tokens - recalled,
                 "completion_tokens": reply.n_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        metrics.add(tokens_in=usage["prompt_tokens"], tokens_out=usage["completion_tokens"],
                    evictions=st.evictions - evictions_before, cells_evicted=st.cells_evicted - evicted_before,
                    tokens_recalled=recalled, recall_s=recall_s)
        cache = {k: conv.published[k] for k in ("cells_cached", "budget", "tokens_seen", "cells_evicted")}
        return {"text": text, "finish_reason": finish or reply.finish_reason, "usage": usage, "cache": cache,
                "logprobs": content, "session_id": conv.id}

    def work(body, turns: list[Turn], session_id: str | None, put: Callable[[object], None],
             cancelled: threading.Event) -> None:
        """A request's whole life in its worker thread: a slot, its conversation's lock, the turns."""
        completion = isinstance(body, CompletionRequest)
        kept = not (completion and session_id is None)  # a later request can continue it
        conv = None
        try:
            digests = chain(turns)
            with store.slot():
                deadline = time.monotonic() + limits.timeout_s
                while True:
                    conv = store.new() if completion and session_id is None else store.find(digests, session_id)
                    with conv.lock:
                        held = 0 if completion else store.held(conv, digests, session_id)
                        if held is None:  # another request moved it on meanwhile: look again
                            continue
                        if not completion and held == 0 and conv.n_messages and turns[0].role == "system":
                            raise ApiError(400, "this conversation has begun: send its whole history, or only its "
                                                "new messages without a system message", param="messages")
                        put(run_turns(conv, turns, held, body, put, cancelled, deadline, kept))
                        break
        except RequestTimeout as exc:
            metrics.add(timeouts=1)
            put(exc)
        except ApiError as exc:
            put(exc)
        except (ValueError, RuntimeError, OSError) as exc:  # the model or the stream could not go on
            sys.stderr.write(f"error: a request failed: {exc}\n")
            put(ApiError(500, str(exc), kind="server_error", code="internal"))
        except Exception as exc:  # a bug: said to the client and in the log, never lost in the thread pool
            traceback.print_exc()
            put(ApiError(500, f"internal error ({type(exc).__name__}: {exc})", kind="server_error", code="internal"))
        finally:
            if conv is not None and (conv.n_messages == 0 or not kept):
                store.discard(conv)
            store.leave()
            put(None)  # the end

    async def serve(request: Request, body, turns: list[Turn]):
        """Admit the request and run it in a worker thread: a JSON reply, or an SSE stream."""
        try:
            store.admit()
        except Busy:
            metrics.add(refused=1)
            raise ApiError(503, "the server is busy: every slot and the queue are taken; retry shortly",
                           kind="server_error", code="busy", headers={"Retry-After": "1"}) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        workers.submit(work, body, turns, request.headers.get("x-session-id"),
                       lambda e: loop.call_soon_threadsafe(events.put_nowait, e), cancelled)
        completion = isinstance(body, CompletionRequest)
        rid = ("cmpl-" if completion else "chatcmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "text_completion" if completion else "chat.completion",
                "created": int(time.time()), "model": model_name}

        def choice(text: str | None, finish: str | None, logprobs: list | None, *, delta: bool,
                   offset: int = 0) -> dict:
            out = {"index": 0, "finish_reason": finish}
            if completion:
                out |= {"text": text or "",
                        "logprobs": None if logprobs is None else completion_logprobs(logprobs, offset)}
            elif delta:
                out |= {"delta": {} if text is None else {"content": text},
                        "logprobs": None if logprobs is None else {"content": logprobs}}
            else:
                out |= {"message": {"role": "assistant", "content": text},
                        "logprobs": None if logprobs is None else {"content": logprobs}}
            return out

        if not body.stream:
            while (event := await events.get()) is not None:
                if isinstance(event, ApiError):
                    raise event
                if isinstance(event, dict):
                    result = event
            return JSONResponse({**head, "choices": [choice(result["text"], result["finish_reason"],
                                                             result["logprobs"], delta=False)],
                                 "usage": result["usage"], "cache": result["cache"],
                                 "session_id": result["session_id"]},
                                headers={"X-Session-Id": result["session_id"]})

        stream_head = head | {"object": "text_completion" if completion else "chat.completion.chunk"}

        def sse(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        async def stream() -> AsyncIterator[str]:
            sent = 0  # characters of the reply streamed so far: completions' text offsets
            try:
                if not completion:
                    yield sse({**stream_head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                           "finish_reason": None, "logprobs": None}]})
                while (event := await events.get()) is not None:
                    if isinstance(event, ApiError):
                        yield sse(event.body())
                    elif isinstance(event, dict):
                        yield sse({**stream_head, "choices": [choice(None, event["finish_reason"], None, delta=True)],
                                   "cache": event["cache"], "session_id": event["session_id"]})
                        if body.stream_options and body.stream_options.include_usage:
                            yield sse({**stream_head, "choices": [], "usage": event["usage"]})
                    else:
                        yield sse({**stream_head, "choices": [choice(event.text, None, event.logprobs, delta=True,
                                                                     offset=sent)]})
                        sent += len(event.text)
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # a client that went away: the reply so far stays in the conversation
        return StreamingResponse(stream(), media_type="text/event-stream")

    # -- routes -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        metrics.count("chat")
        body.refuse_unsupported()
        body.stops()
        body.reply_tokens(limits.max_tokens)
        turns = checked_turns(body.messages, images_allowed=store.settings.mmproj is not None)
        return await serve(request, body, turns)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        metrics.count("completions")
        body.refuse_unsupported()
        body.stops()
        body.reply_tokens(limits.max_tokens)
        if not body.prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        return await serve(request, body, [])

    @app.get("/v1/models")
    async def models():
        metrics.count("models")
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                             "owned_by": "infmllm-gguf"}]}

    @app.get("/v1/sessions/{session_id}")
    async def session_view(session_id: str):
        """A conversation's cache and the end of its stream, cached cells marked (the web page's view),
        as its last completed request left them."""
        metrics.count("sessions")
        view = store.view(session_id)
        if view is None:
            raise ApiError(404, f"no conversation {session_id!r}", param="session_id", code="not_found")
        return view

    @app.get("/health")
    async def health():
        rss = rss_mib()
        return {"status": "ok", "model": model_name, "budget": store.settings.policy.budget,
                "policy": store.settings.policy.config(), "max_sessions": store.max_sessions,
                "parallel": store.parallel, "in_flight": store.in_flight, **store.stats(), "rss_mib": rss,
                "per_session_mib": per_session_mib,
                # each live conversation, and the copy of a state being saved or restored by each
                # slot and by the snapshot thread
                "rss_bound_mib": None if per_session_mib is None else
                base_rss + (store.max_sessions + store.parallel + 1) * per_session_mib}

    base_rss = rss_mib() or 0.0

    @app.get("/metrics")
    async def prometheus():
        st, m = store.stats(), metrics.snapshot()
        lines = ["# TYPE infmllm_requests_total counter"]
        lines += [f'infmllm_requests_total{{route="{k}"}} {v}' for k, v in sorted(m["requests"].items())]
        for name, kind, value in [
                ("infmllm_requests_refused_total", "counter", m["refused"]),
                ("infmllm_requests_timed_out_total", "counter", m["timeouts"]),
                ("infmllm_tokens_in_total", "counter", m["tokens_in"]),
                ("infmllm_tokens_out_total", "counter", m["tokens_out"]),
                ("infmllm_evictions_total", "counter", m["evictions"]),
                ("infmllm_cells_evicted_total", "counter", m["cells_evicted"]),
                ("infmllm_memory_tokens_recalled_total", "counter", m["tokens_recalled"]),
                ("infmllm_memory_recall_seconds_total", "counter", round(m["recall_s"], 6)),
                ("infmllm_memory_tokens_stored", "gauge", st.get("memory_tokens", 0)),
                ("infmllm_sessions_live", "gauge", st["sessions_live"]),
                ("infmllm_sessions_on_disk", "gauge", st["sessions_on_disk"]),
                ("infmllm_cells_cached", "gauge", st["cells_cached"]),
                ("infmllm_session_saves_total", "counter", st["saves"]),
                ("infmllm_session_restores_total", "counter", st["restores"]),
                ("infmllm_requests_replayed_total", "counter", st["replays"]),
                ("infmllm_requests_logged_total", "counter", st["logged"]),
                ("infmllm_request_log_seconds_total", "counter", round(st["log_s"], 6)),
                ("infmllm_snapshot_seconds_total", "counter", round(st["snapshot_s"], 6)),
                ("infmllm_resident_memory_mib", "gauge", rss_mib() or 0)]:
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
