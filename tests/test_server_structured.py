"""`infmllm-gguf serve`'s structured output and full sampler through the official `openai` client, on a
real server process over the default model: replies that follow a JSON schema (streamed and not,
both routes), JSON objects, logit_bias, the penalties, llama.cpp's extensions and seeds, each
reply's JSON validated with `jsonschema`; and every bad option answered 400 with OpenAI's error
body, the conversation it would have continued left as it was."""
import json

import jsonschema
import openai
import pytest

from infmllm_gguf.runtime import Model
from server_process import ARGS, running

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "role", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "role": {"enum": ["admin", "user", "guest"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1,
                                  "maxItems": 3},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["items", "status", "paid"],
         "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                            "type": "object", "additionalProperties": False, "required": ["sku", "size"],
                            "properties": {"sku": {"type": "string", "maxLength": 6},
                                           "size": {"enum": ["S", "M", "L"]}}}},
                        "status": {"enum": ["pending", "shipped", "delivered"]}, "paid": {"type": "boolean"}}}
NOTE = {"type": "object", "additionalProperties": False, "required": ["note"],
        "properties": {"note": {"type": "string", "maxLength": 12}}}
ERROR_KEYS = {"message", "type", "param", "code"}
PROMPT = "The capital of France is"


def schema_format(schema: dict, name: str = "reply") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    with running(ARGS, tmp_path_factory.mktemp("structured") / "state") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def vocab(default_model):
    """The default model's vocabulary, to name tokens by id as logit_bias does."""
    return Model(default_model)


def token_id(vocab: Model, text: str) -> int:
    ids = vocab.tokenize(text, add_special=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def chat(client, content: str, *, stream: bool = False, **options) -> tuple[str, str, object]:
    """A chat reply's text, finish reason and usage (the stream's joined, its usage from the last chunk)."""
    messages = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model="m", messages=messages, **options)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    chunks = list(client.chat.completions.create(model="m", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-2].choices[0].finish_reason, chunks[-1].usage


def complete(client, prompt: str, *, stream: bool = False, response_format=None, **options) -> tuple[str, str]:
    """A completion's text and finish reason; response_format goes in the body (the client's
    completions take none of their own)."""
    extra = {"extra_body": {"response_format": response_format}} if response_format else {}
    if not stream:
        r = client.completions.create(model="m", prompt=prompt, **options, **extra)
        return r.choices[0].text, r.choices[0].finish_reason
    chunks = list(client.completions.create(model="m", prompt=prompt, stream=True, **options, **extra))
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def follows(text: str, schema: dict) -> dict:
    reply = json.loads(text)
    jsonschema.validate(reply, schema)
    return reply


@pytest.mark.parametrize("stream", [False, True])
def test_chat_replies_follow_a_json_schema(client, stream):
    """Nested objects, an enum, an array of bounded length, a pattern, required fields: greedy, and
    drawn at temperature 0.8 with a seed."""
    for options in ({"temperature": 0}, {"temperature": 0.8, "seed": 7}):
        text, finish, _ = chat(client, "Describe a user of a web site.", stream=stream, max_tokens=150,
                               response_format=schema_format(PERSON, "person"), **options)
        assert finish == "stop", text
        follows(text, PERSON)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_follow_a_json_schema(client, stream):
    text, finish = complete(client, "A shop order:\n", stream=stream, max_tokens=150, temperature=0.7, seed=3,
                            response_format=schema_format(ORDER, "order"))
    assert finish == "stop", text
    assert follows(text, ORDER)["items"]


def test_json_object_replies_are_objects(client):
    for stream in (False, True):
        text, finish, _ = chat(client, 'Give a JSON object with a key "answer" set to "yes".', stream=stream,
                               max_tokens=60, temperature=0, response_format={"type": "json_object"})
        assert finish == "stop" and isinstance(json.loads(text), dict), text
    text, finish = complete(client, "A colour as JSON:", max_tokens=60, temperature=0,
                            response_format={"type": "json_object", "schema": NOTE})
    assert finish == "stop", text
    follows(text, NOTE)


def test_a_schema_string_holds_no_control_character(client, vocab):
    """A newline pushed by +100 cannot enter a string: JSON strings hold no raw control character
    (llama-cpp-python's converter lets them through; the server's grammar does not)."""
    newline = token_id(vocab, "\n")
    text, finish, _ = chat(client, "Write a note.", max_tokens=40, temperature=0, logit_bias={str(newline): 100},
                           response_format=schema_format(NOTE))
    assert finish == "stop" and "\n" not in follows(text, NOTE)["note"], text


def test_a_banned_end_still_ends_a_schema_reply(client, vocab):
    """logit_bias -100 is added to the logit, not -inf: once the reply is complete, its grammar allows
    only the end of generation, which the ban of every end token lowers but leaves."""
    ends = [t for t in range(vocab.n_vocab) if vocab.is_end_of_generation(t)]
    text, finish, _ = chat(client, "Write a note.", max_tokens=40, temperature=0,
                           logit_bias={str(t): -100 for t in ends}, response_format=schema_format(NOTE))
    assert finish == "stop", text
    follows(text, NOTE)


def test_logprobs_come_with_a_schema_reply(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Write a note."}],
                                       max_tokens=40, temperature=0, logprobs=True, top_logprobs=2,
                                       response_format=schema_format(NOTE))
    follows(r.choices[0].message.content, NOTE)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    assert "".join(e.token for e in entries) == r.choices[0].message.content


def test_logit_bias_bans_and_forces_tokens(client, vocab):
    greedy, _ = complete(client, PROMPT, max_tokens=1, temperature=0)
    first = token_id(vocab, greedy)
    banned, _ = complete(client, PROMPT, max_tokens=1, temperature=0, logit_bias={str(first): -100})
    assert banned != greedy
    for stream in (False, True):  # drawn at temperature 1, the ban holds too
        text, _ = complete(client, PROMPT, stream=stream, max_tokens=1, temperature=1.0, seed=5,
                           logit_bias={str(first): -100})
        assert text != greedy
    london = token_id(vocab, " London")
    forced, _ = complete(client, PROMPT, max_tokens=1, temperature=0, logit_bias={str(london): 100})
    assert forced == " London"
    text, _, _ = chat(client, "Name a city.", stream=True, max_tokens=1, temperature=1.0,
                      logit_bias={str(london): 100})
    assert text == " London"


def test_penalties_change_a_repeating_greedy_reply(client):
    """The greedy reply repeats its prompt's pattern; each penalty counts the reply's tokens and
    breaks it."""
    prompt = "one, two, one, two, one, two, one, two,"
    plain, _ = complete(client, prompt, max_tokens=16, temperature=0)
    assert plain.count("one") >= 3  # the pattern goes on
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repeat_penalty": 1.5}}):
        for stream in (False, True):
            text, _ = complete(client, prompt, stream=stream, max_tokens=16, temperature=0, **penalty)
            assert text != plain and text.count("one") < plain.count("one"), (penalty, text)
    text, _, _ = chat(client, "Say 'la' ten times.", max_tokens=12, temperature=0)
    penalized, _, _ = chat(client, "Say 'la' ten times.", max_tokens=12, temperature=0, frequency_penalty=2.0)
    assert penalized != text


def test_seeds_top_k_and_min_p(client):
    """Any integer seeds a draw (the same seed, the same reply); top_k 1 and min_p 1 draw the
    likeliest token, as greedy does."""
    greedy, _ = complete(client, "Once upon a time", max_tokens=8, temperature=0)
    for seed in (2 ** 64 + 3, 12345):
        drawn = {complete(client, "Once upon a time", max_tokens=8, temperature=1.5, seed=seed)[0] for _ in range(2)}
        assert len(drawn) == 1
    assert complete(client, "Once upon a time", max_tokens=8, temperature=1.5, seed=1, extra_body={"top_k": 1})[0] \
        == greedy
    assert complete(client, "Once upon a time", max_tokens=8, temperature=1.5, seed=1, extra_body={"min_p": 1.0})[0] \
        == greedy


BAD = [
    ({"response_format": schema_format({"type": "wizard"})}, "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs a schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema",
     "required"),
    ({"response_format": schema_format({"type": "string", "maxLength": 3000})}, "response_format", "grammar"),
    ({"response_format": schema_format({"type": "string", "pattern": "^a{100000000}$"})}, "response_format",
     "repetitions"),
    ({"response_format": schema_format({"$ref": "https://example.com/schema.json"})}, "response_format",
     "not allowed"),
    ({"logit_bias": {"the": 5}}, "logit_bias", "not a token id"),
    ({"logit_bias": {"49152": 5}}, "logit_bias", "0 to 49151"),
    ({"logit_bias": {"-1": 5}}, "logit_bias", "not a token id"),
    ({"logit_bias": {"42": 101}}, "logit_bias.42", "less than or equal to 100"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "less than or equal to 2"),
    ({"presence_penalty": -3}, "presence_penalty", "greater than or equal to -2"),
    ({"repeat_penalty": 0}, "repeat_penalty", "greater than 0"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"top_k": -1}, "top_k", "greater than or equal to 0"),
]


def test_bad_options_answer_400_and_leave_the_conversation(server, client):
    """Streamed or not, on both routes: 400 with OpenAI's error body before anything is fed."""
    messages = [{"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0)
    sid = first.model_extra["session_id"]
    before = server.get(f"/v1/sessions/{sid}")[1]
    history = [*messages, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "Another one."}]
    for options, param, says in BAD:
        for stream in (False, True):
            status, body, headers = server.post("/v1/chat/completions", {"messages": history, "max_tokens": 4,
                                                                         "stream": stream, **options})
            assert status == 400 and headers["content-type"].startswith("application/json"), (options, body)
            assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
            assert body["error"]["param"] == param and says in body["error"]["message"], (options, body)
        status, body, _ = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, **options})
        assert status == 400 and body["error"]["param"] == param, (options, body)
    assert server.get(f"/v1/sessions/{sid}")[1] == before  # the conversation is as it was
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=history, max_tokens=4, logit_bias={"99999": 1})
    assert refused.value.status_code == 400 and "not a token id" in refused.value.message
    again = client.chat.completions.create(model="m", messages=history, max_tokens=4, temperature=0)
    assert again.model_extra["session_id"] == sid  # it continues the conversation as it was


def test_the_served_schema_describes_the_options(server):
    schemas = server.get("/openapi.json")[1]["components"]["schemas"]
    for request in ("ChatRequest", "CompletionRequest"):
        properties = schemas[request]["properties"]
        for name in ("response_format", "logit_bias", "frequency_penalty", "presence_penalty", "top_k", "min_p",
                     "repeat_penalty", "seed"):
            assert name in properties, (request, name)
    assert schemas["ResponseFormat"]["properties"]["type"]["enum"] == ["text", "json_object", "json_schema"]
    assert "schema" in schemas["JsonSchemaFormat"]["required"]
