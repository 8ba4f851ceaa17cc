"""The served OpenAPI schema, as the server answers: FastAPI documents a 422 it never sends (a body
that does not validate answers 400, as OpenAI's API does) and leaves out the error statuses and
the content types that are not JSON. Client generators and API fuzzers read this schema."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

#: OpenAI's error body (`api.ApiError.body`)
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

#: what each route answers besides its 200: 400 checks and bounds, 401 a wrong API key (when one
#: is set), 404 an unknown conversation, 408 --request-timeout, 413 --max-body-mib, 503 a full queue
ERRORS = {("post", "/v1/chat/completions"): (400, 408, 413, 503), ("post", "/v1/completions"): (400, 408, 413, 503),
          ("get", "/v1/sessions/{session_id}"): (404,)}

#: one server-sent event of a streamed reply: its data (a chunk's JSON, the last "[DONE]")
EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}

#: a reply: whole (JSON) or streamed (events)
REPLY = {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": EVENT}}

#: the 200s that are not (only) JSON
CONTENT = {("post", "/v1/chat/completions"): REPLY, ("post", "/v1/completions"): REPLY,
           ("get", "/metrics"): {"text/plain": {"schema": {"type": "string"}}},
           ("get", "/"): {"text/html": {"schema": {"type": "string"}}}}


def served_schema(app: FastAPI, *, api_key: bool) -> dict:
    """`app`'s OpenAPI schema with the statuses and content types it really answers (made once)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
        error = {"description": "an OpenAI error body",
                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                responses = operation["responses"]
                responses.pop("422", None)
                statuses = ERRORS.get((method, path), ()) + ((401,) if api_key else ())
                responses.update({str(status): error for status in statuses})
                if (method, path) in CONTENT:
                    responses["200"]["content"] = CONTENT[method, path]
        for name in ("HTTPValidationError", "ValidationError"):  # the 422's body, never sent
            schema["components"]["schemas"].pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
