"""`infmllm-gguf serve` fuzzed through its own OpenAPI schema (schemathesis, property-based): a real
server process over the default model, every operation of the schema it serves at /openapi.json,
bodies as the schema allows them (positive) and as it does not (negative).

Each response is checked for: no 5xx, an answer within `TIMEOUT_S` (no hang), and conformance to the
served schema completed with what the server documents (README, "Requests are bounded") but FastAPI
does not write into /openapi.json: the error statuses each route answers, all with OpenAI's error
body, the reply objects, a streamed reply's content type and events, /metrics' and the page's
content types (`contract`; the reply objects are checked more closely than the served schema
says). The served schema documents the statuses and content types too
(`test_the_served_schema_documents_what_the_server_answers`).

Generation is bounded by the server (`--max-tokens 8`, `--max-prompt-tokens 512`): a request asking
more is a quick 400, one asking nothing gets 8 tokens. Half of the positive chat and completion
bodies are repaired into requests the server can accept (roles in a renderable order, content
present, max_tokens within the cap) so that the fuzzer reaches the model, the sampler and the
journal, not only the checks of `server/api.py`.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import time

import pytest

pytest.importorskip("schemathesis")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

from server_process import running  # noqa: E402

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
ARGS = ["--budget", "96", "--recent", "16", "--chunk", "32", "--threads", "1", "--no-flash-attn",
        "--max-tokens", str(MAX_TOKENS), "--max-prompt-tokens", "512", "--request-timeout", "30",
        "--max-sessions", "2"]
TIMEOUT_S = 30  # per request: a hang is a finding, never a stuck test
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# (operation label, mode) -> examples (positive, negative): 257 requests, about 35 s on 2 cores (the
# suite's share; FUZZ_SEED picks other cases, FUZZ_SCALE=4 runs four times as many)
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
EXAMPLES = {op: tuple(round(n * SCALE) for n in counts) for op, counts in {
    "POST /v1/chat/completions": (100, 30), "POST /v1/completions": (70, 30), "GET /v1/sessions/{session_id}": (15, 0),
    "GET /v1/models": (3, 0), "GET /health": (3, 0), "GET /metrics": (3, 0), "GET /": (3, 0)}.items()}

# Findings, each fixed with a test: a negative seed answered 500, a validation error 422, a tiny
# temperature 500 (NaN), a body that is not UTF-8 Starlette's {"detail"}, a prompt of no token 500
# ("nothing to continue"), a lone surrogate 500; the served schema lacked the statuses it answers.
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "37"))  # the same cases each run; another seed, other cases

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
         "properties": {k: {"type": "integer", "minimum": 0}
                        for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
FINISH = {"enum": ["stop", "length"]}
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}  # as schemathesis parses one


def reply(choice: dict, kind: str) -> dict:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage", "session_id"],
            "properties": {"id": {"type": "string"}, "object": {"const": kind}, "created": {"type": "integer"},
                           "model": {"type": "string"}, "usage": USAGE, "session_id": {"type": "string"},
                           "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                               "type": "object", "required": ["index", "finish_reason", *choice],
                               "properties": {"index": {"const": 0}, "finish_reason": FINISH, **choice}}}}}


CHAT = reply({"message": {"type": "object", "required": ["role", "content"],
                          "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}},
              "logprobs": {"type": ["object", "null"]}}, "chat.completion")
COMPLETION = reply({"text": {"type": "string"}, "logprobs": {"type": ["object", "null"]}}, "text_completion")


def json_body(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def contract(served: dict) -> dict:
    """The served schema with what the server documents but FastAPI leaves out."""
    spec = copy.deepcopy(served)
    errors = lambda *codes: {str(c): {"description": "an OpenAI error body", "content": json_body(ERROR)}
                             for c in codes}
    paths = spec["paths"]
    for path, schema in [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]:
        # 400: checks, validation and bounds; 408: --request-timeout; 413: --max-body-mib; 503: the
        # queue is full
        paths[path]["post"]["responses"] = {
            "200": {"description": "a reply, or its events", "content": {
                **json_body(schema), "text/event-stream": {"schema": SSE_EVENT}}},
            **errors(400, 408, 413, 503)}
    paths["/v1/sessions/{session_id}"]["get"]["responses"] = {
        "200": {"description": "a conversation's view", "content": json_body({"type": "object"})},
        **errors(404)}
    paths["/v1/models"]["get"]["responses"]["200"]["content"] = json_body(
        {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["id", "object"], "properties": {"id": {"type": "string"}}}}}})
    paths["/health"]["get"]["responses"]["200"]["content"] = json_body(
        {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}})
    paths["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    paths["/"]["get"]["responses"]["200"]["content"] = {"text/html": {"schema": {"type": "string"}}}
    return spec


def repair(body, cap: int, data) -> dict:
    """A generated body turned into one the server can accept (most of what the fuzzer drew kept:
    texts, sampling values, penalties, response formats, logprobs, stream options), so that the
    request reaches the model, the sampler chain and its grammar."""
    body = dict(body) if isinstance(body, dict) else {}
    for key in ("max_completion_tokens", "logit_bias", "tools", "tool_choice", "functions", "function_call",
                "audio", "modalities", "prediction", "best_of", "echo", "suffix"):  # logit_bias: drawn keys
        body.pop(key, None)                                                     # are no token ids
    body["max_tokens"] = data.draw(st.none() | st.integers(1, cap))
    if not (isinstance(body.get("stop"), str) and body["stop"]) and not (
            isinstance(body.get("stop"), list) and len(body["stop"]) <= 4 and all(body["stop"])):
        body.pop("stop", None)
    if "messages" in body:
        texts = [m.get("content") if isinstance(m.get("content"), str) else "" for m in body["messages"]]
        texts = [t for t in texts if t.strip()] or [data.draw(st.text(min_size=1, max_size=40))]
        system = data.draw(st.none() | st.text(max_size=30))
        messages = [{"role": "system", "content": system}] if system is not None else []
        for i, t in enumerate(texts[-5:]):  # user, assistant, user, ...: the last the user's
            messages.append({"role": "user" if (len(texts[-5:]) - 1 - i) % 2 == 0 else "assistant", "content": t})
        if messages[-1]["role"] != "user" or (len(messages) > 1 and messages[0]["role"] == "assistant"):
            messages = [{"role": "user", "content": t} for t in texts[-1:]]
        body["messages"] = messages
    elif not body.get("prompt"):
        body["prompt"] = data.draw(st.text(min_size=1, max_size=40))
    return body


def sse_events(text: str) -> list:
    """The events of a streamed reply: each `data: JSON`, the last `data: [DONE]`."""
    lines = [line for line in text.split("\n") if line]
    assert lines and lines[-1] == "data: [DONE]", f"the stream does not end with [DONE]: {text[-200:]!r}"
    assert all(line.startswith("data: ") for line in lines), f"a stream line is not an event: {text[:300]!r}"
    return [json.loads(line[6:]) for line in lines[:-1]]


def media_type(response) -> str:
    value = response.headers.get("content-type") or [""]  # schemathesis' Response: each header a list
    return (value[0] if isinstance(value, list) else value).split(";")[0].strip()


class Findings:
    """Every finding of a run, grouped (a fuzzer's run goes on after one, so that a single run shows
    them all), and the cases counted per operation, mode and status."""

    def __init__(self):
        self.found: dict[str, list] = collections.defaultdict(list)
        self.cases: collections.Counter = collections.Counter()
        self.seconds: collections.Counter = collections.Counter()

    def add(self, key: str, case, detail: str) -> None:
        self.found[key].append((case.operation.label, case.body if case.body is not None else case.path_parameters,
                                detail[:400]))

    def report(self) -> str:
        out = []
        for key, hits in self.found.items():
            op, body, detail = hits[0]
            out.append(f"{key}: {len(hits)} case(s); first: {op} {json.dumps(body, default=str)[:1500]}\n    {detail}")
        return "\n".join(out)


def check(case, response, elapsed: float, findings: Findings) -> None:
    label, status = case.operation.label, response.status_code
    if status == 422:
        findings.add("a validation error answers 422 (OpenAI answers 400)", case, response.text)
    try:
        case.validate_response(response, checks=CHECKS)
    except (Failure, FailureGroup) as exc:
        failures = exc.exceptions if isinstance(exc, FailureGroup) else [exc]
        for f in failures:
            findings.add(f"{type(f).__name__}: {f.title}", case, f"{status} {f.message}\n    {response.text[:200]}")
    streamed = media_type(response) == "text/event-stream"
    if streamed and status == 200:
        try:
            events = sse_events(response.text)
        except (AssertionError, ValueError) as exc:
            findings.add("a malformed event stream", case, str(exc))
            return
        for event in events:
            if "error" in event:
                e = event["error"]
                if e.get("type") == "server_error" or not e.get("message"):
                    findings.add("a server error inside a stream", case, json.dumps(event))
            elif not event.get("choices") and "usage" not in event:
                findings.add("a stream event with neither choices nor usage", case, json.dumps(event))
    if status == 200 and label.startswith("POST") and not streamed:
        usage = response.json()["usage"]
        if usage["completion_tokens"] > MAX_TOKENS:
            findings.add(f"a reply longer than --max-tokens {MAX_TOKENS}", case, json.dumps(usage))
        if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
            findings.add("usage does not add up", case, json.dumps(usage))


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    with running(ARGS, tmp_path_factory.mktemp("fuzz") / "state") as server:
        yield server


def fuzz(server, spec: dict, findings: Findings) -> None:
    schema = schemathesis.openapi.from_dict(spec)
    operations = {op.ok().label: op.ok() for op in schema.get_all_operations()}
    assert set(operations) == set(EXAMPLES), f"the schema's operations changed: {sorted(operations)}"
    for label, op in operations.items():
        for mode, n in zip((GenerationMode.POSITIVE, GenerationMode.NEGATIVE), EXAMPLES[label]):
            if not n:
                continue

            @seed(FUZZ_SEED)
            @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode), data=st.data())
            def one(case, data):
                if mode is GenerationMode.POSITIVE and label.startswith("POST") and data.draw(st.booleans()):
                    case.body = repair(case.body, MAX_TOKENS, data)
                t0 = time.monotonic()
                try:
                    response = case.call(base_url=server.url, timeout=TIMEOUT_S)
                except Exception as exc:  # requests' ReadTimeout: a hang; ConnectionError: the server died
                    findings.add(f"no answer within {TIMEOUT_S} s ({type(exc).__name__})", case, str(exc))
                    return
                elapsed = time.monotonic() - t0
                findings.cases[(label, mode.value, response.status_code)] += 1
                findings.seconds[(label, mode.value)] += elapsed
                check(case, response, elapsed, findings)

            one()


def test_the_server_answers_every_fuzzed_request_as_its_schema_says(server):
    findings = Findings()
    spec = contract(server.get("/openapi.json")[1])
    t0 = time.monotonic()
    fuzz(server, spec, findings)
    status, health, _ = server.get("/health")  # still up, and not stuck in a request
    print(f"\nfuzzed (FUZZ_SEED={FUZZ_SEED}) in {time.monotonic() - t0:.0f} s: {sum(findings.cases.values())} requests")
    for key, n in sorted(findings.cases.items()):
        print(f"  {key[0]:32s} {key[1]:9s} {key[2]}: {n}")
    for key, s in sorted(findings.seconds.items()):
        print(f"  {key[0]:32s} {key[1]:9s} {s:.1f} s")
    assert status == 200 and health["in_flight"] == 0, health
    assert not findings.found, "findings:\n" + findings.report()


def post(server, path: str, raw: bytes):
    return server.request("POST", path, raw=raw)


def test_a_lone_surrogate_is_refused_not_a_500(server):
    """JSON carries "\\ud800", UTF-8 cannot: it answered 500 (the tokenizer's UnicodeEncodeError) in a
    prompt, a message, a content part; now the body's check refuses it."""
    for path, body in [("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 1}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 1}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", '
                                                b'"text": "\\ud83d"}]}], "max_tokens": 1}'),
                       ("/v1/completions", b'{"prompt": "a", "stop": ["\\ud800"], "max_tokens": 1}')]:
        status, answer, _ = post(server, path, body)
        assert status == 400, (path, body, status, answer)
        assert "lone surrogate" in answer["error"]["message"], answer


def test_a_prompt_of_no_token_is_refused(server):
    status, answer, _ = post(server, "/v1/completions", b'{"prompt": "\\u0004", "max_tokens": 1}')
    assert status == 400, (status, answer)


def test_an_unparseable_body_gets_an_openai_error(server):
    status, answer, _ = server.request("POST", "/v1/chat/completions", raw=b"\x92T")
    assert status == 400 and isinstance(answer, dict) and answer.get("error", {}).get("message"), answer


def test_the_served_schema_documents_what_the_server_answers(server):
    """What `contract` adds to the served schema belongs in it: each route's error statuses with
    OpenAI's error body, and the real content types."""
    schema = schemathesis.openapi.from_dict(server.get("/openapi.json")[1])
    problems = []
    for path, method, body in [("/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": MAX_TOKENS + 1}),
                               ("/v1/chat/completions", "POST", {"messages": []}),
                               ("/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": 1, "stream": True}),
                               ("/v1/sessions/{session_id}", "GET", None),
                               ("/metrics", "GET", None), ("/", "GET", None)]:
        op = schema[path][method]
        case = op.Case(body=body, path_parameters={"session_id": "none"} if "{" in path else None) \
            if body is not None else op.Case(path_parameters={"session_id": "none"} if "{" in path else None)
        response = case.call(base_url=server.url, timeout=TIMEOUT_S)
        try:
            case.validate_response(response, checks=CHECKS[1:])
        except (Failure, FailureGroup) as exc:
            problems += [f"{method} {path} {response.status_code}: {f.title}"
                         for f in (exc.exceptions if isinstance(exc, FailureGroup) else [exc])]
    assert not problems, "\n".join(problems)
