"""`RequestRunner`: a request's job (`jobs`) admitted or refused (503), run in a worker thread under a
slot and its conversation's lock, its reply sent whole (JSON) or as server-sent events while it
is generated."""
from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, NamedTuple

from fastapi.responses import JSONResponse, StreamingResponse

from ..openai_format import head, logprob_entry, usage
from ..session import StreamSession
from .admission import Busy
from .api import ApiError, turn_digests
from .conversations import Conversation, ConversationStore
from .jobs import Job
from .limits import Limits
from .metrics import Metrics


class RequestTimeout(ApiError):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request ran past this server's limit of {seconds:g} s (serve --request-timeout); "
                              "the conversation is as it was before it", code="timeout")


class Chunk(NamedTuple):
    """A piece of a streamed reply: its text and, when asked for, its tokens' logprobs entries."""
    text: str
    logprobs: list[dict] | None


class Result(NamedTuple):
    """A reply done: what its last event says."""
    text: str
    finish_reason: str
    usage: dict
    cache: dict
    logprobs: list[dict] | None
    session_id: str


def memory_counters(session: StreamSession) -> tuple[int, float]:
    """Tokens the memory re-read and its seconds so far (zeros without a memory)."""
    if session.memory is None:
        return 0, 0.0
    st = session.memory.stats
    return st.tokens_recalled, st.recall_s


class RequestRunner:
    def __init__(self, store: ConversationStore, limits: Limits, metrics: Metrics, model_name: str):
        self.store, self.limits, self.metrics, self.model_name = store, limits, metrics, model_name
        # one thread per admitted request at most: requests beyond are refused before they get here
        self.workers = ThreadPoolExecutor(max_workers=store.parallel + store.queue, thread_name_prefix="request")

    def shutdown(self) -> None:
        """Let the requests in flight finish."""
        self.workers.shutdown(wait=True)

    # -- the event loop's side --------------------------------------------------------------
    async def serve(self, job: Job):
        """Admit the job and run it in a worker thread: a JSON reply, or an SSE stream."""
        try:
            self.store.admission.admit()
        except Busy:
            self.metrics.add(refused=1)
            raise ApiError(503, "the server is busy: every slot and the queue are taken; retry shortly",
                           kind="server_error", code="busy", headers={"Retry-After": "1"}) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        self.workers.submit(self.work, job, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), cancelled)
        rid = job.id_prefix + uuid.uuid4().hex[:24]
        if not job.body.stream:
            return await self.reply(job, rid, events)
        return StreamingResponse(self.stream(job, rid, events, cancelled), media_type="text/event-stream")

    async def reply(self, job: Job, rid: str, events: asyncio.Queue) -> JSONResponse:
        while (event := await events.get()) is not None:
            if isinstance(event, ApiError):
                raise event
            if isinstance(event, Result):
                result = event
        return JSONResponse({**head(rid, job.object, self.model_name),
                             "choices": [job.choice(result.text, result.finish_reason, result.logprobs, stream=False)],
                             "usage": result.usage, "cache": result.cache, "session_id": result.session_id},
                            headers={"X-Session-Id": result.session_id})

    async def stream(self, job: Job, rid: str, events: asyncio.Queue,
                     cancelled: threading.Event) -> AsyncIterator[str]:
        chunk_head = head(rid, job.chunk_object, self.model_name)

        def sse(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"
        sent = 0  # characters of the reply streamed so far: completions' text offsets
        try:
            first = job.first_chunk(chunk_head)
            if first is not None:
                yield sse(first)
            while (event := await events.get()) is not None:
                if isinstance(event, ApiError):
                    yield sse(event.body())
                elif isinstance(event, Result):
                    for choice in job.stream_choices(None, None, offset=sent):
                        yield sse({**chunk_head, "choices": [choice]})
                    yield sse({**chunk_head, "choices": [job.choice(None, event.finish_reason, None, stream=True)],
                               "cache": event.cache, "session_id": event.session_id})
                    if job.body.stream_options and job.body.stream_options.include_usage:
                        yield sse({**chunk_head, "choices": [], "usage": event.usage})
                else:
                    for choice in job.stream_choices(event.text, event.logprobs, offset=sent):
                        yield sse({**chunk_head, "choices": [choice]})
                    sent += len(event.text)
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # a client that went away: the reply so far stays in the conversation

    # -- the worker thread's side -----------------------------------------------------------
    def work(self, job: Job, put: Callable[[object], None], cancelled: threading.Event) -> None:
        """A request's whole life in its worker thread: a slot, its conversation's lock, the job;
        every event handed to `put`, None last."""
        store, conv = self.store, None
        try:
            with store.admission.slot():
                deadline = time.monotonic() + self.limits.timeout_s
                while True:
                    conv = job.conversation(store)
                    with conv.lock:
                        held = job.held(store, conv)
                        if held is None:  # another request moved it on meanwhile: look again
                            continue
                        put(self.run(job, conv, held, put, cancelled, deadline))
                        break
        except RequestTimeout as exc:
            self.metrics.add(timeouts=1)
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
            if conv is not None and (conv.n_messages == 0 or not job.kept):
                store.discard(conv)
            store.admission.leave()
            put(None)  # the end

    def check_prompt(self, session: StreamSession, texts: list[str]) -> None:
        n = sum(len(session.model.tokenize(t, add_special=False, parse_special=False)) for t in texts)
        if n > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the request's new messages are {n} tokens; this server reads at most "
                                f"{self.limits.max_prompt_tokens} per request (serve --max-prompt-tokens): send "
                                "them in several requests", param="messages", code="prompt_too_long")

    def run(self, job: Job, conv: Conversation, held: int, emit: Callable[[Chunk], None],
            cancelled: threading.Event, deadline: float) -> Result:
        """Under the conversation's lock: feed what the stream has not read of the job, generate the
        reply and hand each piece to `emit`; a job that is `kept` has the request logged before
        this returns. Fails without changing the conversation."""
        session = self.store.live(conv)
        self.check_prompt(session, job.new_texts(held))
        st = session.stats
        before, evictions_before, evicted_before = st.tokens_seen, st.evictions, st.cells_evicted
        memory_before = memory_counters(session)
        top = job.top_logprobs
        # llama.cpp's chain, its options checked when the job was made; without a seed, the
        # conversation's generator draws one
        sampler = session.chain_sampler(**job.sampling)
        text, finish, content = "", None, None if top is None else []
        try:
            pieces = job.start(session, held, max_tokens=job.max_tokens, stop=job.stops, sampler=sampler,
                               logprobs=top)
            try:
                for piece in pieces:
                    finish = piece.finish_reason
                    if finish is not None:
                        break  # the last piece: no text, logprobs of a stop string's tokens at most
                    entries = None if top is None else [
                        {**logprob_entry(session.model.token_bytes(t.token), t.logprob),
                         "top_logprobs": [logprob_entry(session.model.token_bytes(i), lp) for i, lp in t.top]}
                        for t in piece.logprobs]
                    if content is not None:
                        content += entries
                    text += piece
                    emit(Chunk(piece, entries))
                    if cancelled.is_set():
                        break  # a client that left: the reply so far stays in the conversation
                    if time.monotonic() > deadline:
                        raise RequestTimeout(self.limits.timeout_s)
            finally:
                pieces.close()
            fed, entry = job.fed(held, text)
            self.store.record(conv, turn_digests(fed, start=conv.digest)[-1], conv.n_messages + len(fed),
                              entry if job.kept else None)
        except BaseException:
            self.store.rollback(conv)  # back to its last completed request, on disk
            raise
        finally:
            sampler.close()
        reply, st = session.last_reply, session.stats
        recalled, recall_s = (after - b for after, b in zip(memory_counters(session), memory_before))
        counts = usage(st.tokens_seen - before - reply.n_tokens - recalled, reply.n_tokens)
        self.metrics.add(tokens_in=counts["prompt_tokens"], tokens_out=counts["completion_tokens"],
                         evictions=st.evictions - evictions_before, cells_evicted=st.cells_evicted - evicted_before,
                         tokens_recalled=recalled, recall_s=recall_s)
        cache = {k: conv.published[k] for k in ("cells_cached", "budget", "tokens_seen", "cells_evicted")}
        return Result(text, finish or reply.finish_reason, counts, cache, content, conv.id)
