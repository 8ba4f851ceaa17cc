"""A check of `infmllm-gguf serve`'s tool calls: prompts sent with `tools` and `tool_choice` "required"
or a named function through the official `openai` client, each asked whole and streamed, every call
validated with `jsonschema` against its tool's parameters, the streamed calls compared with the whole.

    python scripts/tools_check.py [MODEL] [--prompts 50] [--max-tokens 400] [--json OUT.json] [-- extra serve args...]
    e.g.  python scripts/tools_check.py ~/.cache/infmllm-gguf/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

One server process (`serve_load.Server`: a free port, a temporary --state-dir, --threads N, then the
extra args). `TOOLS` declares ten functions (nested object arguments, enums, arrays, required and
optional fields, integers, numbers, booleans, patterns); prompt i is request (i // 10) mod 5 of tool
i mod 10 (`REQUESTS`: a user request that suits that tool), a new conversation each, and by i mod 3:
  0  "required", every tool declared;
  1  "required", a subset declared (the suited tool and three others, in a shuffled order);
  2  the suited tool named ({"type": "function", "function": {"name": ...}}), every tool declared;
with parallel_tool_calls false for every fourth prompt (i mod 4 == 3). Each prompt goes twice at
--temperature with seed i: whole, then streamed (with usage in the last chunk), its `tool_calls`
deltas accumulated by index as OpenAI's SDK documents them (id and name set, arguments
concatenated). Each reply must end with finish_reason "tool_calls" and at least one call (at most
one without parallel calls), each call with an id, naming a declared tool (the named one, if a
function is named), its arguments JSON that validates against that tool's parameters; and the
streamed calls must be the whole reply's (names and arguments, in order).

It prints, per kind of prompt: prompts, calls (of both replies), valid calls, replies without a
call, prompts whose streamed calls equal the whole reply's, prompts whose whole reply calls the tool
the request suits first ("right tool": reported, not checked: small models choose poorly; a named
tool is always the suited one), a request's prompt tokens (the tools' listing is most of them,
read anew by each request: a new conversation), completion tokens, wall time and tokens/s
(completion tokens over the requests' wall time, the prompt's reading included); then the first
failures. The exit status is 1 when a call is invalid,
a reply has no call, the streamed calls differ from the whole, a request failed, or the server did
not start or stop cleanly.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import openai

from serve_load import Server, print_rows, split_serve_args, stop_checked

DATE = {"type": "string", "pattern": "^2025-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"}
TIME = {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"}
EMAIL = {"type": "string", "pattern": "^[a-z0-9._]{1,16}@[a-z0-9]{1,12}[.](com|org|net)$"}
AIRPORT = {"type": "string", "pattern": "^[A-Z]{3}$", "description": "IATA airport code"}
CURRENCY = {"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 code"}


def function(name: str, description: str, required: list[str], properties: dict, *, closed: bool = True) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required}
    if closed:
        parameters["additionalProperties"] = False
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


# the grammar enforces what these use (types, enums, required, additionalProperties, maxLength,
# min/maxItems, patterns); llama-cpp-python's converter ignores minimum and maximum, so none here
TOOLS = [
    function("get_weather", "Current weather and forecast for a city", ["city", "unit"], {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "description": "days of forecast"},
        "include": {"type": "array", "maxItems": 3, "items": {"enum": ["wind", "humidity", "uv", "rain"]}}}),
    function("search_flights", "Search flights between two airports", ["origin", "destination", "date", "passengers"], {
        "origin": AIRPORT, "destination": AIRPORT, "date": DATE, "passengers": {"type": "integer"},
        "cabin": {"enum": ["economy", "premium", "business", "first"]}, "nonstop": {"type": "boolean"},
        "return_date": DATE}),
    function("create_event", "Create a calendar event", ["title", "start", "duration_minutes"], {
        "title": {"type": "string", "maxLength": 40},
        "start": {"type": "object", "additionalProperties": False, "required": ["date", "time"],
                  "properties": {"date": DATE, "time": TIME}},
        "duration_minutes": {"type": "integer"},
        "attendees": {"type": "array", "maxItems": 4, "items": EMAIL},
        "reminder": {"type": "object", "additionalProperties": False, "required": ["minutes_before"],
                     "properties": {"minutes_before": {"type": "integer"}, "method": {"enum": ["email", "popup"]}}}}),
    function("convert_currency", "Convert an amount of money between currencies", ["amount", "from", "to"], {
        "amount": {"type": "number"}, "from": CURRENCY, "to": CURRENCY}),
    function("book_restaurant", "Book a table at a restaurant", ["restaurant", "party_size", "time"], {
        "restaurant": {"type": "string", "maxLength": 40}, "party_size": {"type": "integer"}, "time": TIME,
        "date": DATE,
        "requests": {"type": "array", "maxItems": 3,
                     "items": {"enum": ["vegetarian", "wheelchair", "high_chair", "window_seat", "quiet"]}}}),
    function("send_email", "Send an email", ["to", "subject", "body"], {
        "to": {"type": "array", "minItems": 1, "maxItems": 3, "items": EMAIL},
        "subject": {"type": "string", "maxLength": 60}, "body": {"type": "string", "maxLength": 200},
        "cc": {"type": "array", "maxItems": 2, "items": EMAIL}, "priority": {"enum": ["low", "normal", "high"]}}),
    function("set_reminder", "Set a reminder", ["text", "at"], {
        "text": {"type": "string", "maxLength": 60},
        "at": {"type": "object", "additionalProperties": False, "required": ["date", "time"],
               "properties": {"date": DATE, "time": TIME}},
        "repeat": {"enum": ["never", "daily", "weekly", "monthly"]}}),
    function("search_products", "Search an online shop's catalogue", ["query"], {
        "query": {"type": "string", "maxLength": 40},
        "filters": {"type": "object", "additionalProperties": False, "properties": {
            "max_price": {"type": "number"}, "min_rating": {"type": "number"}, "in_stock": {"type": "boolean"},
            "category": {"enum": ["electronics", "books", "clothing", "home", "toys", "sports"]}}},
        "sort_by": {"enum": ["relevance", "price_asc", "price_desc", "rating"]}, "limit": {"type": "integer"}},
        closed=False),
    function("translate_text", "Translate a text into another language", ["text", "target_language"], {
        "text": {"type": "string", "maxLength": 120},
        "source_language": {"type": "string", "pattern": "^[a-z]{2}$", "description": "ISO 639-1 code"},
        "target_language": {"type": "string", "pattern": "^[a-z]{2}$", "description": "ISO 639-1 code"},
        "formal": {"type": "boolean"}}),
    function("control_device", "Control a smart home device", ["device", "action"], {
        "device": {"type": "object", "additionalProperties": False, "required": ["kind", "room"],
                   "properties": {"kind": {"enum": ["light", "thermostat", "speaker", "blinds", "lock"]},
                                  "room": {"type": "string", "maxLength": 20}}},
        "action": {"enum": ["on", "off", "set", "lock", "unlock"]},
        "settings": {"type": "object", "additionalProperties": False, "properties": {
            "brightness": {"type": "integer"}, "temperature_c": {"type": "number"},
            "color": {"enum": ["warm", "cold", "red", "green", "blue"]}, "volume": {"type": "integer"}}}}),
]
NAMES = [t["function"]["name"] for t in TOOLS]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
REQUESTS = [  # REQUESTS[k] suits TOOLS[k]
    ["What's the weather like in Oslo right now, in celsius?", "Will it rain in Lisbon over the next 3 days?",
     "Give me the forecast for Chicago in fahrenheit, with wind and humidity.", "How hot is it in Cairo today?",
     "I'm going to Tokyo tomorrow: what's the weather going to be?"],
    ["Find me a flight from JFK to LHR on 2025-03-14 for 2 people.",
     "Search nonstop business class flights from Paris CDG to Montreal YUL on 2025-06-01, one passenger.",
     "I need 4 economy seats from SFO to NRT on 2025-09-20, returning 2025-10-02.",
     "Are there flights from Madrid (MAD) to Berlin (BER) on 2025-05-05 for 3 travellers?",
     "Look up a first class flight from Dubai DXB to Sydney SYD for one person on 2025-12-24."],
    ["Put a team meeting in my calendar on 2025-04-10 at 14:00 for 45 minutes.",
     "Schedule a dentist appointment on 2025-02-03 at 09:30, one hour, remind me 30 minutes before by popup.",
     "Create an event 'Project kickoff' on 2025-07-01 at 10:00 for 90 minutes with ana@acme.com and bo@acme.com.",
     "Add lunch with Sam to my calendar, 2025-03-21 at 12:30, for an hour.",
     "Block 2 hours on 2025-11-11 at 16:00 for 'Quarterly review' and email me a reminder an hour before."],
    ["How much is 250 US dollars in euros?", "Convert 1,000 Japanese yen to British pounds.",
     "What do 75.50 Swiss francs come to in Canadian dollars?", "Change 3200 Indian rupees into US dollars.",
     "I have 40 euros: how many Australian dollars is that?"],
    ["Book a table for 4 at 7pm at Chez Paul.", "Reserve a table for two at Sakura Sushi tomorrow at 20:30, by the window.",
     "Get us a table at Luigi's for 6 people at 18:00 on 2025-05-17, we need a high chair.",
     "I'd like to book dinner for 3 at The Green Fork at 19:15; one of us is vegetarian.",
     "Can you reserve a quiet table for 2 at Le Bernardin at 21:00?"],
    ["Email bob@example.com that the meeting moved to Friday.",
     "Send a high priority email to team@acme.com with the subject 'Server down' saying the API is failing.",
     "Write to alice@mail.org and carol@mail.org: subject 'Dinner', body 'Are you free on Saturday?'",
     "Send my landlord jim@rentals.net an email saying the heating is broken, cc me at me@home.com.",
     "Email hr@company.com asking for two days off next week."],
    ["Remind me to call mum on 2025-03-02 at 18:00.", "Set a reminder to water the plants every week, from 2025-04-06 at 08:00.",
     "Remind me to take my pills daily at 21:00 starting 2025-01-15.",
     "I need a reminder on 2025-08-30 at 07:45 to leave for the airport.",
     "Set a monthly reminder to pay the rent, starting 2025-02-01 at 09:00."],
    ["Find wireless headphones under 100 dollars.", "Search for running shoes, sorted by rating, in stock only.",
     "Show me the 5 cheapest board games for kids.", "I'm looking for a science fiction book rated at least 4 stars.",
     "Look for a coffee maker for the kitchen, most expensive first."],
    ["Translate 'Where is the train station?' into Spanish.", "How do you say 'thank you very much' in Japanese?",
     "Translate this into formal German: 'Can you send me the invoice?'",
     "Translate 'Je voudrais un café' from French to English.", "Put 'Happy birthday, my friend' into Italian."],
    ["Turn on the lights in the living room.", "Set the bedroom thermostat to 21 degrees.",
     "Lock the front door lock in the hall.", "Dim the kitchen lights to 30 percent, warm color.",
     "Turn the speaker in the office off."],
]
KINDS = ["required", "required, subset", "named"]


@dataclass
class Prompt:
    index: int
    tool: str  # the tool the request suits
    text: str
    kind: str
    declared: list[dict]
    tool_choice: str | dict
    parallel: bool

    def allowed(self) -> set[str]:
        """The tools a call may name."""
        return {self.tool} if self.kind == "named" else {t["function"]["name"] for t in self.declared}


def prompts(n: int) -> list[Prompt]:
    out = []
    for i in range(n):
        k = i % len(TOOLS)
        text = REQUESTS[k][(i // len(TOOLS)) % len(REQUESTS[k])]
        kind = KINDS[i % len(KINDS)]
        declared, choice = list(TOOLS), "required"
        if kind == "required, subset":
            rng = random.Random(i)
            declared = [TOOLS[k], *rng.sample([t for t in TOOLS if t is not TOOLS[k]], 3)]
            rng.shuffle(declared)
        elif kind == "named":
            choice = {"type": "function", "function": {"name": NAMES[k]}}
        out.append(Prompt(i, NAMES[k], text, kind, declared, choice, parallel=i % 4 != 3))
    return out


@dataclass
class Reply:
    calls: list[tuple[str, str, str]]  # (id, name, arguments)
    finish: str | None
    content: str | None
    prompt_tokens: int
    tokens: int  # the completion's
    seconds: float


def ask(client: openai.OpenAI, p: Prompt, *, stream: bool, **options) -> Reply:
    """A chat reply's calls, finish reason, content, completion tokens and the request's wall time;
    streamed, its deltas accumulated as OpenAI's SDK documents (by index: id and name set, the
    arguments concatenated)."""
    request = dict(model="m", messages=[{"role": "user", "content": p.text}], tools=p.declared,
                   tool_choice=p.tool_choice, parallel_tool_calls=p.parallel, **options)
    t0 = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(**request)
        message = r.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
        return Reply(calls, r.choices[0].finish_reason, message.content, r.usage.prompt_tokens,
                     r.usage.completion_tokens, time.perf_counter() - t0)
    by_index: dict[int, dict] = {}
    content, finish, usage = [], None, None
    for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        content.append(choice.delta.content or "")
        for delta in choice.delta.tool_calls or []:
            call = by_index.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            if delta.id:
                call["id"] = delta.id
            if delta.function and delta.function.name:
                call["name"] = delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
    calls = [(c["id"], c["name"], c["arguments"]) for _, c in sorted(by_index.items())]
    return Reply(calls, finish, "".join(content) or None, usage.prompt_tokens if usage else 0,
                 usage.completion_tokens if usage else 0, time.perf_counter() - t0)


def call_problem(call: tuple[str, str, str], p: Prompt) -> str | None:
    """What is wrong with a call for prompt `p` (None: nothing)."""
    call_id, name, arguments = call
    if not call_id:
        return "no id"
    if name not in p.allowed():
        return f"names {name!r}, not one of {sorted(p.allowed())}"
    try:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    except ValueError as exc:  # json's JSONDecodeError
        return f"arguments not JSON ({exc})"
    except jsonschema.ValidationError as exc:
        return f"arguments do not validate ({exc.message})"
    return None


@dataclass
class Tally:
    """What one kind of prompt gave."""
    prompts: int = 0
    requests: int = 0
    errors: int = 0  # requests that failed
    calls: int = 0
    valid: int = 0
    no_call: int = 0  # replies without finish_reason tool_calls and a call (or with several when parallel is off)
    alike: int = 0  # prompts whose streamed calls are the whole reply's
    right: int = 0  # prompts whose whole reply calls the suited tool first
    prompt_tokens: int = 0
    tokens: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # the first few

    def fail(self, message: str) -> None:
        if len(self.failures) < 5:
            self.failures.append(message[:400])

    def add(self, p: Prompt, whole: Reply | None, streamed: Reply | None) -> None:
        self.prompts += 1
        what = f"#{p.index} {p.tool} ({p.kind}{'' if p.parallel else ', one call'})"
        for reply, how in ((whole, "whole"), (streamed, "streamed")):
            if reply is None:
                continue
            self.prompt_tokens += reply.prompt_tokens
            self.tokens += reply.tokens
            self.seconds += reply.seconds
            self.calls += len(reply.calls)
            if reply.finish != "tool_calls" or not reply.calls or not p.parallel and len(reply.calls) > 1:
                self.no_call += 1
                self.fail(f"{what} {how}: finish_reason {reply.finish!r}, {len(reply.calls)} calls, "
                          f"content {reply.content!r}")
            for call in reply.calls:
                problem = call_problem(call, p)
                if problem is None:
                    self.valid += 1
                else:
                    self.fail(f"{what} {how}: {problem}: {call[1]}({call[2][:200]})")
        if whole is not None and streamed is not None:
            if [c[1:] for c in whole.calls] == [c[1:] for c in streamed.calls]:
                self.alike += 1
            else:
                self.fail(f"{what}: streamed {[c[1:] for c in streamed.calls]} != whole {[c[1:] for c in whole.calls]}")
        if whole is not None and whole.calls and whole.calls[0][1] == p.tool:
            self.right += 1

    def merge(self, other: Tally) -> None:
        for name, value in vars(other).items():
            if name != "failures":
                setattr(self, name, getattr(self, name) + value)

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.calls - self.valid or self.no_call or self.prompts - self.alike)

    def row(self, name: str) -> list[str]:
        return [name, str(self.prompts), str(self.requests), str(self.errors), str(self.calls), str(self.valid),
                str(self.no_call), str(self.alike), f"{self.right} ({100 * self.right / max(self.prompts, 1):.0f}%)",
                f"{self.prompt_tokens / max(self.requests, 1):.0f}", str(self.tokens), f"{self.seconds:.0f}",
                f"{self.tokens / max(self.seconds, 1e-9):.1f}"]


def run(args: argparse.Namespace, extra: list[str]) -> tuple[dict[str, Tally], int]:
    """Every prompt, whole then streamed, on one server: a tally per kind; the server's exit status last."""
    tallies = {kind: Tally() for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="tools-check-") as tmp:
        server = Server(args.model, args.threads, extra, Path(tmp))
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
            print(f"serving {server.health()['model']} on {server.url}", flush=True)
            for p in prompts(args.prompts):
                tally = tallies[p.kind]
                replies = []
                for stream in (False, True):
                    tally.requests += 1
                    try:
                        replies.append(ask(client, p, stream=stream, max_tokens=args.max_tokens,
                                           temperature=args.temperature, seed=p.index))
                    except openai.APIError as exc:  # a status, a connection error, or an error event in a stream
                        tally.errors += 1
                        tally.fail(f"#{p.index} {p.tool} {'streamed' if stream else 'whole'}: "
                                   f"{type(exc).__name__}: {exc}")
                        replies.append(None)
                tally.add(p, *replies)
                if (p.index + 1) % 10 == 0:
                    print(f"  {p.index + 1}/{args.prompts} prompts", flush=True)
        finally:
            exit_code = stop_checked(server)
    return tallies, exit_code


def print_table(tallies: dict[str, Tally]) -> None:
    total = Tally()
    for t in tallies.values():
        total.merge(t)
    head = ["tool_choice", "prompts", "requests", "errors", "calls", "valid", "no call", "streamed==whole",
            "right tool", "prompt tok", "tokens", "wall s", "tok/s"]
    print_rows(head, [t.row(kind) for kind, t in tallies.items() if t.prompts] + [total.row("all")])
    print("calls and valid: of the whole and the streamed replies; no call: replies without finish_reason "
          "tool_calls and a call (or with several where parallel_tool_calls is false); streamed==whole: prompts; "
          "right tool: prompts whose whole reply calls the tool the request suits first (not checked); prompt tok: a "
          "request's prompt tokens (the tools' listing included), tokens: completion tokens, tok/s: those over the "
          "requests' wall time (the prompt's reading included)")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, extra = split_serve_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [MODEL] [options] [-- extra serve args...]")
    p.add_argument("model", nargs="?", type=Path, help="GGUF file (default: the serve command's default model)")
    p.add_argument("--prompts", type=int, default=50, help="prompts (each asked whole and streamed)")
    p.add_argument("--max-tokens", type=int, default=400, help="each reply's max_tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="the replies' temperature (prompt i: seed i)")
    p.add_argument("--threads", type=int, default=1, help="serve's --threads (an extra --threads wins)")
    p.add_argument("--json", type=Path, help="write the figures and the first failures here")
    args = p.parse_args(ours)
    if args.prompts < 1 or args.max_tokens < 1:
        p.error("--prompts and --max-tokens must be positive")
    return args, extra


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    try:
        tallies, exit_code = run(args, extra)
    except RuntimeError as exc:  # a server that did not start: what it printed says why
        print(exc, file=sys.stderr)
        return 1
    print_table(tallies)
    for t in tallies.values():
        for failure in t.failures:
            print(f"  {failure}")
    if args.json:
        args.json.write_text(json.dumps({"argv": argv, "serve_args": extra, "tallies": {k: vars(t) for k, t in
                                                                                         tallies.items()},
                                         "server_exit_code": exit_code}, indent=1))
    return int(any(t.failed for t in tallies.values()) or exit_code != 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
