"""The OpenAI-compatible HTTP server (FastAPI): chat and text completions streamed or not, models,
health, Prometheus metrics, a session view and the web page, over a `ConversationStore`. The routes
make a job of each request (`jobs`) and hand it to the `RequestRunner`."""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..probes import rss_mib
from .api import ApiError, ChatRequest, CompletionRequest, error_from_validation
from .conversations import ConversationStore
from .jobs import ChatJob, CompletionJob
from .limits import Limits
from .metrics import Metrics, prometheus_text
from .middleware import ApiKey, BodyLimit
from .runner import RequestRunner
from .schema import served_schema

STATIC = Path(__file__).parent / "static"


def create_app(store: ConversationStore, *, model_name: str, api_key: str | None = None,
               per_session_mib: float | None = None, limits: Limits = Limits()) -> FastAPI:
    metrics = Metrics()
    runner = RequestRunner(store, limits, metrics, model_name)
    started, base_rss = time.time(), rss_mib() or 0.0

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store.start_snapshots()
        yield
        runner.shutdown()  # the requests in flight finish first
        await run_in_threadpool(store.save_all)  # a restarted server continues every conversation

    app = FastAPI(title="infmllm-gguf", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key)  # the outer one: checked first

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # a body it cannot parse, an unknown route
        err = ApiError(exc.status_code, str(exc.detail))
        return JSONResponse(err.body(), status_code=err.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            err = ApiError(400, "the request body is not valid JSON", code="invalid_json")
        else:
            err = error_from_validation(errors)
        return JSONResponse(err.body(), status_code=err.status)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        metrics.count("chat")
        return await runner.serve(ChatJob(body, limits, request.headers.get("x-session-id"), store.model,
                                          images_allowed=store.settings.mmproj is not None))

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        metrics.count("completions")
        return await runner.serve(CompletionJob(body, limits, request.headers.get("x-session-id"), store.model))

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
        return {"status": "ok", "model": model_name, "budget": store.settings.policy.budget,
                "policy": store.settings.policy.config(), "max_sessions": store.max_sessions,
                "parallel": store.parallel, "in_flight": store.admission.in_flight, **store.stats(),
                "rss_mib": rss_mib(), "per_session_mib": per_session_mib,
                # each live conversation, and the copy of a state being saved or restored by each
                # slot and by the snapshot thread
                "rss_bound_mib": None if per_session_mib is None else
                base_rss + (store.max_sessions + store.parallel + 1) * per_session_mib}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(prometheus_text(metrics.snapshot(), store.stats(), rss_mib() or 0),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.openapi = lambda: served_schema(app, api_key=api_key is not None)
    return app
