"""The OpenAI-compatible HTTP server (FastAPI): chat and text completions streamed or not, models,
health, Prometheus metrics, a session view and the web page, over a `ConversationStore`."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..generation import log_softmax, make_sampler
from ..probes import rss_mib
from ..session import StreamSession
from .api import ApiError, ChatRequest, CompletionRequest, Turn, chain, checked_turns, error_from_validation
from .conversations import Busy, Conversation, ConversationStore

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 256


@dataclass
class Metrics:
    requests: dict
    tokens_in: int = 0
    tokens_out: int = 0
    evictions: int = 0
    cells_evicted: int = 0
    refused: int = 0
    tokens_recalled: int = 0   # re-read from the memory tier before prompts
    recall_s: float = 0.0

    def count(self, route: str) -> None:
        self.requests[route] = self.requests.get(route, 0) + 1


class LogprobRecorder:
    """A sampler that also notes, for each token it picks, its log-probability and the top ones."""

    def __init__(self, sample: Callable[[np.ndarray], int], token_bytes: Callable[[int], bytes], top: int):
        self.sample, self.token_bytes, self.top = sample, token_bytes, top
        self.content: list[dict] = []

    def entry(self, token: int, logprob: float) -> dict:
        data = self.token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    def __call__(self, logits: np.ndarray) -> int:
        token = self.sample(logits)
        logp = log_softmax(logits)
        best = np.argsort(-logp)[:self.top]
        self.content.append({**self.entry(token, float(logp[token])),
                             "top_logprobs": [self.entry(int(t), float(logp[t])) for t in best]})
        return token


def create_app(store: ConversationStore, *, model_name: str, api_key: str | None = None,
               per_session_mib: float | None = None) -> FastAPI:
    metrics = Metrics(requests={})
    started = time.time()
    # one thread per admitted request at most: requests beyond are refused before they get here
    workers = ThreadPoolExecutor(max_workers=store.parallel + store.queue, thread_name_prefix="request")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        workers.shutdown(wait=True)  # the requests in flight finish first
        await run_in_threadpool(store.save_all)  # a restarted server continues every conversation

    app = FastAPI(title="infmllm-gguf", lifespan=lifespan)

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

    def cache_of(session: StreamSession) -> dict:
        st = session.stats
        return {"cells_cached": st.cells_cached, "budget": session.policy.budget, "tokens_seen": st.tokens_seen,
                "cells_evicted": st.cells_evicted}

    def memory_counters(session: StreamSession) -> tuple[int, float]:
        """Tokens the memory re-read and its seconds so far (zeros without a memory)."""
        if session.memory is None:
            return 0, 0.0
        st = session.memory.stats
        return st.tokens_recalled, st.recall_s

    def memory_of(session: StreamSession) -> dict | None:
        """What the session view shows of the memory: its size and the text re-read at the last prompt."""
        if session.memory is None:
            return None
        st = session.memory.stats
        return {"ranking": session.memory.config.ranking, "tokens_stored": st.tokens_stored,
                "host_bytes": st.host_bytes, "tokens_recalled": st.tokens_recalled, "recall_s": round(st.recall_s, 3),
                "last_recalled": st.last_recalled}

    # -- the work of one request, in a worker thread ----------------------------------------
    def run_turns(conv: Conversation, turns: list[Turn], held: int, body, emit: Callable[[str], None],
                  cancelled: threading.Event) -> dict:
        """Feed what the stream has not read of the request (its new messages, or a completion's
        prompt), generate the reply and hand each piece to `emit`."""
        session = store.live(conv)
        st = session.stats
        before, evictions_before, evicted_before = st.tokens_seen, st.evictions, st.cells_evicted
        memory_before = memory_counters(session)
        completion = isinstance(body, CompletionRequest)
        rng = np.random.default_rng(body.seed) if body.seed is not None else session.rng
        sampler = make_sampler(body.temperature, body.top_p, rng)
        top = body.logprobs if completion else (body.top_logprobs or 0) if body.logprobs else None
        recorder = None if top is None else LogprobRecorder(sampler, session.model.token_bytes, top)
        options = dict(max_tokens=getattr(body, "max_completion_tokens", None) or body.max_tokens or DEFAULT_MAX_TOKENS,
                       stop=body.stops(), sampler=recorder or sampler)
        if completion:
            pieces = session.generate(body.prompt, **options)
        else:
            new = turns[held:]
            system = new.pop(0).text if new[0].role == "system" else None
            i = 0
            while i < len(new) - 1:  # history this stream has not read: replayed, not sampled
                t = new[i]
                answered = new[i + 1].role == "assistant"
                session.user_turn(t.text, media=list(t.images) or None, system=system, add_assistant=answered)
                if answered:
                    session.assistant_turn(new[i + 1].text)
                i += 2 if answered else 1
                system = None
            pieces = session.chat_stream(new[-1].text, media=list(new[-1].images) or None, system=system, **options)
        text = ""
        try:
            for piece in pieces:
                text += piece
                emit(piece)
                if cancelled.is_set():
                    break
        finally:
            pieces.close()  # a reply cut short stays part of the conversation
        reply, st = session.last_reply, session.stats
        if completion:
            store.record(conv, chain([Turn("user", body.prompt + text)], start=conv.digest)[-1], conv.n_messages + 1)
        else:
            fed = turns[held:] + [Turn("assistant", text)]
            store.record(conv, chain(fed, start=conv.digest)[-1], conv.n_messages + len(fed))
        recalled, recall_s = (after - b for after, b in zip(memory_counters(session), memory_before))
        usage = {"prompt_tokens": st.tokens_seen - before - reply.n_tokens - recalled,
                 "completion_tokens": reply.n_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        metrics.tokens_in += usage["prompt_tokens"]
        metrics.tokens_out += usage["completion_tokens"]
        metrics.evictions += st.evictions - evictions_before
        metrics.cells_evicted += st.cells_evicted - evicted_before
        metrics.tokens_recalled += recalled
        metrics.recall_s += recall_s
        return {"text": text, "finish_reason": reply.finish_reason, "usage": usage, "cache": cache_of(session),
                "logprobs": recorder.content if recorder else None, "session_id": conv.id}

    def work(body, turns: list[Turn], session_id: str | None, put: Callable[[object], None],
             cancelled: threading.Event) -> None:
        """A request's whole life in its worker thread: a slot, its conversation's lock, the turns."""
        completion = isinstance(body, CompletionRequest)
        digests = chain(turns)
        conv = None
        try:
            with store.slot():
                while True:
                    conv = store.new() if completion and session_id is None else store.find(digests, session_id)
                    with conv.lock:
                        held = 0 if completion else store.held(conv, digests, session_id)
                        if held is None:  # another request moved it on meanwhile: look again
                            continue
                        if not completion and held == 0 and conv.n_messages and turns[0].role == "system":
                            raise ApiError(400, "this conversation has begun: send its whole history, or only its "
                                                "new messages without a system message", param="messages")
                        put(run_turns(conv, turns, held, body, put, cancelled))
                        break
        except ApiError as exc:
            put(exc)
        except (ValueError, RuntimeError, OSError) as exc:  # the model or the stream could not go on
            put(ApiError(500, str(exc), kind="server_error", code="internal"))
        finally:
            if conv is not None and (conv.n_messages == 0 or (completion and session_id is None)):
                store.discard(conv)
            store.leave()
            put(None)  # the end

    async def serve(request: Request, body, turns: list[Turn]):
        """Admit the request and run it in a worker thread: a JSON reply, or an SSE stream."""
        try:
            store.admit()
        except Busy:
            metrics.refused += 1
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

        def choice(text: str | None, finish: str | None, logprobs: list | None, *, delta: bool) -> dict:
            out = {"index": 0, "finish_reason": finish}
            if completion:
                out |= {"text": text or "", "logprobs": None if logprobs is None else completion_logprobs(logprobs)}
            elif delta:
                out |= {"delta": {} if text is None else {"content": text}, "logprobs": None}
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
                        yield sse({**stream_head, "choices": [choice(event, None, None, delta=True)]})
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # a client that went away: the reply so far stays in the conversation
        return StreamingResponse(stream(), media_type="text/event-stream")

    def completion_logprobs(content: list[dict]) -> dict:
        offsets, at = [], 0
        for c in content:
            offsets.append(at)
            at += len(c["token"])
        return {"tokens": [c["token"] for c in content], "token_logprobs": [c["logprob"] for c in content],
                "top_logprobs": [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content],
                "text_offset": offsets}

    # -- routes -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        metrics.count("chat")
        body.refuse_unsupported()
        body.stops()
        turns = checked_turns(body.messages, images_allowed=store.settings.mmproj is not None)
        return await serve(request, body, turns)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        metrics.count("completions")
        body.refuse_unsupported()
        body.stops()
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
        """A conversation's cache and the end of its stream, cached cells marked (the web page's view)."""
        metrics.count("sessions")
        conv = store.conversations.get(session_id)
        if conv is None:
            raise ApiError(404, f"no conversation {session_id!r}", param="session_id", code="not_found")
        session = conv.session
        if session is None:
            return {"id": conv.id, "live": False, "messages": conv.n_messages}
        st = session.stats
        return {"id": conv.id, "live": True, "messages": conv.n_messages, **cache_of(session),
                "evictions": st.evictions, "image_tokens_seen": st.image_tokens_seen,
                "memory": memory_of(session), "view": session.recent_view()}

    @app.get("/health")
    async def health():
        rss = rss_mib()
        return {"status": "ok", "model": model_name, "budget": store.settings.policy.budget,
                "policy": store.settings.policy.config(), "max_sessions": store.max_sessions,
                "parallel": store.parallel, "in_flight": store.in_flight, **store.stats(), "rss_mib": rss,
                "per_session_mib": per_session_mib,
                # each live conversation, and each slot's copy of a state being saved or restored
                "rss_bound_mib": None if per_session_mib is None else
                base_rss + (store.max_sessions + store.parallel) * per_session_mib}

    base_rss = rss_mib() or 0.0

    @app.get("/metrics")
    async def prometheus():
        st = store.stats()
        lines = ["# TYPE infmllm_requests_total counter"]
        lines += [f'infmllm_requests_total{{route="{k}"}} {v}' for k, v in sorted(metrics.requests.items())]
        for name, kind, value in [
                ("infmllm_requests_refused_total", "counter", metrics.refused),
                ("infmllm_tokens_in_total", "counter", metrics.tokens_in),
                ("infmllm_tokens_out_total", "counter", metrics.tokens_out),
                ("infmllm_evictions_total", "counter", metrics.evictions),
                ("infmllm_cells_evicted_total", "counter", metrics.cells_evicted),
                ("infmllm_memory_tokens_recalled_total", "counter", metrics.tokens_recalled),
                ("infmllm_memory_recall_seconds_total", "counter", round(metrics.recall_s, 6)),
                ("infmllm_memory_tokens_stored", "gauge", st.get("memory_tokens", 0)),
                ("infmllm_sessions_live", "gauge", st["sessions_live"]),
                ("infmllm_sessions_on_disk", "gauge", st["sessions_on_disk"]),
                ("infmllm_cells_cached", "gauge", st["cells_cached"]),
                ("infmllm_session_saves_total", "counter", st["saves"]),
                ("infmllm_session_restores_total", "counter", st["restores"]),
                ("infmllm_resident_memory_mib", "gauge", rss_mib() or 0)]:
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
