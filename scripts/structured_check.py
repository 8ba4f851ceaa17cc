"""A check of `infmllm-gguf serve`'s structured output: prompts sent with a `response_format` json_schema
through the official `openai` client, each reply parsed and validated with `jsonschema`, and what the
grammar costs (the same prompts without response_format, on the same server).

    python scripts/structured_check.py [MODEL] [--prompts 50] [--max-tokens 400] [--json OUT.json] [-- extra serve args...]
    e.g.  python scripts/structured_check.py ~/.cache/infmllm-gguf/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

One server process (`serve_load.Server`: a free port, a temporary --state-dir, --threads N, then the
extra args). Prompt i asks for an object of schema i mod 10 (`SCHEMAS`: nested objects, enums,
arrays, required and optional fields, patterns, anyOf, numbers and booleans) about one of five
subjects, on the chat route, every other one streamed (with usage in the last chunk), at
--temperature with seed i. Right after it, the same prompt goes without response_format, asking
as many tokens as the structured reply had, so that both generate about the same number of
tokens (a plain reply may end sooner) on the same machine at the same moment: the grammar's cost
is the difference of their seconds per token (the client's wall time of each request over its
completion tokens, the prompt's reading included alike).

It prints, per kind of request: requests, replies that parse as JSON, that validate against their
schema, that hit max_tokens (a reply cut short cannot validate: raise --max-tokens), completion
tokens, tokens/s and ms/token; then the grammar's cost, and the first failures. The exit status is
1 when a structured reply failed to validate without hitting max_tokens, a request failed, or the
server did not start or stop cleanly.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import openai

from serve_load import Server, print_rows, split_serve_args, stop_checked

SUBJECT_SCHEMAS = [
    (["a user of a web site", "a nurse who lives in Lyon", "a retired sailor", "a student of music",
      "a bakery owner"],
     {"type": "object", "additionalProperties": False, "required": ["name", "role", "tags", "address"],
      "properties": {"name": {"type": "string", "maxLength": 24}, "role": {"enum": ["admin", "user", "guest"]},
                     "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1,
                              "maxItems": 3},
                     "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                 "properties": {"city": {"type": "string", "maxLength": 24},
                                                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}),
    (["an order of shirts", "an order of shoes", "a gift order", "an order of socks", "a large order of hats"],
     {"type": "object", "additionalProperties": False, "required": ["items", "status", "paid"],
      "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                         "type": "object", "additionalProperties": False, "required": ["sku", "size", "quantity"],
                         "properties": {"sku": {"type": "string", "maxLength": 8}, "size": {"enum": ["S", "M", "L"]},
                                        "quantity": {"type": "integer"}}}},
                     "status": {"enum": ["pending", "shipped", "delivered"]}, "paid": {"type": "boolean"}}}),
    (["the weather in Oslo", "the weather in Cairo", "a stormy day at sea", "a winter morning in Montreal",
      "a summer afternoon in Rome"],
     {"type": "object", "additionalProperties": False, "required": ["city", "condition", "temperature_c", "wind"],
      "properties": {"city": {"type": "string", "maxLength": 24},
                     "condition": {"enum": ["sunny", "cloudy", "rain", "snow"]}, "temperature_c": {"type": "number"},
                     "wind": {"type": "object", "additionalProperties": False, "required": ["speed_kmh", "direction"],
                              "properties": {"speed_kmh": {"type": "integer"},
                                             "direction": {"enum": ["N", "E", "S", "W"]}}}}}),
    (["a novel about a lighthouse", "a cookbook", "a history of Rome", "a book of poems", "a detective story"],
     {"type": "object", "additionalProperties": False, "required": ["title", "author", "genres"],
      "properties": {"title": {"type": "string", "maxLength": 40},
                     "author": {"type": "object", "additionalProperties": False, "required": ["first", "last"],
                                "properties": {"first": {"type": "string", "maxLength": 20},
                                               "last": {"type": "string", "maxLength": 20}}},
                     "genres": {"type": "array", "minItems": 1, "maxItems": 3,
                                "items": {"enum": ["fiction", "history", "poetry", "food", "crime"]}},
                     "year": {"type": "integer"}}}),
    (["a pancake recipe", "a tomato soup recipe", "a lemon cake recipe", "a salad recipe", "a bread recipe"],
     {"type": "object", "additionalProperties": False, "required": ["name", "servings", "ingredients", "vegetarian"],
      "properties": {"name": {"type": "string", "maxLength": 30}, "servings": {"type": "integer"},
                     "ingredients": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
                         "type": "object", "additionalProperties": False, "required": ["item", "grams"],
                         "properties": {"item": {"type": "string", "maxLength": 20}, "grams": {"type": "integer"}}}},
                     "vegetarian": {"type": "boolean"}}}),
    (["a team meeting", "a birthday party", "a concert", "a job interview", "a school trip"],
     {"type": "object", "additionalProperties": False, "required": ["title", "date", "attendees", "priority"],
      "properties": {"title": {"type": "string", "maxLength": 30},
                     "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                     "attendees": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 16}},
                     "online": {"type": "boolean"}, "priority": {"enum": ["low", "medium", "high"]}}}),
    (["a review of a phone", "a review of a restaurant", "a review of a film", "a review of a hotel",
      "a review of a bicycle"],
     {"type": "object", "additionalProperties": False, "required": ["product", "rating", "pros", "cons"],
      "properties": {"product": {"type": "string", "maxLength": 30}, "rating": {"enum": [1, 2, 3, 4, 5]},
                     "pros": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 24}},
                     "cons": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 24}},
                     "summary": {"type": "string", "maxLength": 60}}}),
    (["the sentence 'I love this place'", "the sentence 'The bus was late again'", "the sentence 'It is Tuesday'",
      "the sentence 'What a wonderful gift'", "the sentence 'The food was cold'"],
     {"type": "object", "additionalProperties": False, "required": ["label", "confidence"],
      "properties": {"label": {"enum": ["positive", "negative", "neutral"]}, "confidence": {"type": "number"},
                     "reason": {"type": "string", "maxLength": 60}}}),
    (["a plumber", "a dentist", "a lawyer", "a florist", "a taxi company"],
     {"type": "object", "additionalProperties": False, "required": ["name", "email", "id"],
      "properties": {"name": {"type": "string", "maxLength": 30},
                     "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,10}[.](com|org|net)$"},
                     "id": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}]},
                     "phone": {"type": "string", "pattern": "^\\+?[0-9]{6,12}$"}}}),
    (["moving house", "a garden project", "launching a web site", "a wedding", "a school play"],
     {"type": "object", "additionalProperties": False, "required": ["project", "tasks"],
      "properties": {"project": {"type": "string", "maxLength": 30},
                     "tasks": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                         "type": "object", "additionalProperties": False, "required": ["title", "done", "assignee"],
                         "properties": {"title": {"type": "string", "maxLength": 30}, "done": {"type": "boolean"},
                                        "assignee": {"anyOf": [{"type": "null"},
                                                               {"type": "string", "maxLength": 16}]}}}}}}),
]
SCHEMA_NAMES = ["person", "order", "weather", "book", "recipe", "event", "review", "sentiment", "contact", "tasks"]


def prompts(n: int) -> list[tuple[str, str, dict]]:
    """(schema name, prompt, schema) for prompt i: schema i mod 10, its subjects in turn."""
    out = []
    for i in range(n):
        subjects, schema = SUBJECT_SCHEMAS[i % len(SUBJECT_SCHEMAS)]
        subject = subjects[(i // len(SUBJECT_SCHEMAS)) % len(subjects)]
        out.append((SCHEMA_NAMES[i % len(SCHEMA_NAMES)], f"Describe {subject} as a JSON object.", schema))
    return out


@dataclass
class Tally:
    """What one kind of request (structured, plain) gave."""
    requests: int = 0
    streamed: int = 0
    parsed: int = 0
    valid: int = 0
    cut: int = 0  # finish_reason "length"
    tokens: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # the first few replies that do not validate

    def add(self, text: str, finish: str, tokens: int, seconds: float, schema: dict, *, stream: bool,
            what: str) -> None:
        self.requests += 1
        self.streamed += stream
        self.cut += finish == "length"
        self.tokens += tokens
        self.seconds += seconds
        try:
            jsonschema.validate(json.loads(text), schema)
            self.parsed += 1
            self.valid += 1
        except ValueError as exc:  # json's JSONDecodeError
            self.fail(f"{what} ({finish}): not JSON ({exc}): {text[:200]!r}")
        except jsonschema.ValidationError as exc:
            self.parsed += 1
            self.fail(f"{what} ({finish}): does not validate ({exc.message}): {text[:200]!r}")

    def fail(self, message: str) -> None:
        if len(self.failures) < 5:
            self.failures.append(message)

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / max(self.tokens, 1)

    def row(self, name: str) -> list[str]:
        return [name, str(self.requests), str(self.streamed), str(self.parsed), str(self.valid), str(self.cut),
                str(self.tokens), f"{self.seconds:.1f}", f"{self.tokens / self.seconds:.1f}",
                f"{self.ms_per_token:.1f}"]


def ask(client: openai.OpenAI, prompt: str, *, stream: bool, **options) -> tuple[str, str, int, float]:
    """A chat reply: its text, finish reason, completion tokens, and the request's wall time."""
    messages = [{"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    if stream:
        chunks = list(client.chat.completions.create(model="m", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **options))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices)
        usage = chunks[-1].usage
    else:
        r = client.chat.completions.create(model="m", messages=messages, **options)
        text, finish, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    return text, finish, usage.completion_tokens, time.perf_counter() - t0


def run(args: argparse.Namespace, extra: list[str]) -> tuple[Tally, Tally, int]:
    """Both kinds of request, interleaved, on one server; the server's exit status last."""
    structured, plain = Tally(), Tally()
    with tempfile.TemporaryDirectory(prefix="structured-check-") as tmp:
        server = Server(args.model, args.threads, extra, Path(tmp))
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
            print(f"serving {server.health()['model']} on {server.url}", flush=True)
            for i, (name, prompt, schema) in enumerate(prompts(args.prompts)):
                stream = i % 2 == 1
                sampling = {"temperature": args.temperature, "seed": i}
                fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
                reply = ask(client, prompt, stream=stream, max_tokens=args.max_tokens, response_format=fmt, **sampling)
                structured.add(*reply, schema, stream=stream, what=f"#{i} {name}")
                tokens = reply[2]
                reply = ask(client, prompt, stream=stream, max_tokens=max(tokens, 1), **sampling)
                plain.add(*reply, schema, stream=stream, what=f"#{i} {name}")
                if (i + 1) % 10 == 0:
                    print(f"  {i + 1}/{args.prompts} prompts", flush=True)
        finally:
            exit_code = stop_checked(server)
    return structured, plain, exit_code


def print_table(structured: Tally, plain: Tally) -> None:
    head = ["requests", "n", "streamed", "parsed", "valid", "cut", "tokens", "wall s", "tok/s", "ms/tok"]
    rows = [structured.row("json_schema"), plain.row("plain")]
    print_rows(head, rows)
    cost = structured.ms_per_token - plain.ms_per_token
    print(f"the grammar's cost: {cost:+.1f} ms a token ({100 * cost / plain.ms_per_token:+.0f}% of a plain token's "
          "time); cut: replies that hit max_tokens (a plain reply asks as many tokens as its structured one had: "
          "most end there); plain parsed/valid: replies that happen to be JSON that follows the schema")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, extra = split_serve_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [MODEL] [options] [-- extra serve args...]")
    p.add_argument("model", nargs="?", type=Path, help="GGUF file (default: the serve command's default model)")
    p.add_argument("--prompts", type=int, default=50, help="structured requests (each followed by a plain one)")
    p.add_argument("--max-tokens", type=int, default=400, help="a structured reply's max_tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="both kinds' temperature (prompt i: seed i)")
    p.add_argument("--threads", type=int, default=1, help="serve's --threads (an extra --threads wins)")
    p.add_argument("--json", type=Path, help="write the figures and the first failures here")
    args = p.parse_args(ours)
    if args.prompts < 1 or args.max_tokens < 1:
        p.error("--prompts and --max-tokens must be positive")
    return args, extra


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    try:
        structured, plain, exit_code = run(args, extra)
    except RuntimeError as exc:  # a server that did not start: what it printed says why
        print(exc, file=sys.stderr)
        return 1
    except openai.OpenAIError as exc:
        print(f"a request failed: {exc}", file=sys.stderr)
        return 1
    print_table(structured, plain)
    for failure in structured.failures:
        print(f"  {failure}")
    if args.json:
        args.json.write_text(json.dumps({"argv": argv, "serve_args": extra, "structured": vars(structured),
                                         "plain": vars(plain), "server_exit_code": exit_code}, indent=1))
    invalid = structured.requests - structured.valid - structured.cut
    return int(invalid > 0 or exit_code != 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
