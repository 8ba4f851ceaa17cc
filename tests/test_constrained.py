"""Constrained decoding in a bounded stream: a grammar's reply follows it while the cache evicts
under it, and a saved stream restored elsewhere constrains (and samples) as the original does."""
import json

import jsonschema
import pytest

from infmllm_gguf import StreamSession
from infmllm_gguf.tools import parse_reply

#: 150 objects of about 13 tokens each: a reply of about 2,000 tokens
LONG = {"type": "array", "minItems": 150, "maxItems": 150,
        "items": {"type": "object", "required": ["n", "w"],
                  "properties": {"n": {"type": "integer"}, "w": {"type": "string", "pattern": "^[a-z]{1,8}$"}}}}
PERSON = {"type": "object", "required": ["name", "age", "tags"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


@pytest.mark.slow
def test_a_2000_token_json_reply_validates_while_a_256_cell_cache_evicts(default_model):
    with StreamSession(default_model, budget=256, chunk=64, generation_headroom=32, n_threads=2, memory=False) as s:
        s.feed_text("A list of 150 numbered words, as JSON:\n")
        before = s.stats.cells_evicted
        pieces = list(s.generate(max_tokens=3000, temperature=0.8, seed=1, json_schema=LONG))
        text, reply, stats = "".join(pieces), s.last_reply, s.stats
    print(f"\n{reply.n_tokens} tokens of JSON, {stats.cells_evicted - before} cells evicted meanwhile, "
          f"peak {stats.peak_cells} cells")
    assert reply.finish_reason == "stop" and reply.n_tokens > 1800
    assert stats.cells_evicted - before > reply.n_tokens - 256 and stats.peak_cells <= 256 + 32
    jsonschema.validate(json.loads(text), LONG)


def test_a_restored_stream_constrains_and_samples_as_the_saved_one(default_model, tmp_path):
    """Saved after a tool call, the stream and its copy restored from the file give the same
    reply to the tool's result and the same schema-constrained reply (same seeds): the grammar, the
    declared tools and the draw all come back."""
    def continue_(s):
        after_tool = s.chat([("tool", "42")], max_tokens=12, temperature=0.9, seed=6)
        person = s.chat("Describe a person as JSON.", max_tokens=80, temperature=0.9, seed=5, json_schema=PERSON)
        return person, after_tool

    with StreamSession(default_model, budget=256, n_threads=2) as s:
        call = s.chat("Add 40 and 2.", tools=[ADD], tool_choice="required", max_tokens=40, temperature=0)
        assert [c.name for c in parse_reply(call, {"add"})[1]] == ["add"]
        s.save(tmp_path / "saved")
        original = continue_(s)
    with StreamSession.restore(tmp_path / "saved", default_model) as r:
        assert r.transcript.tools == [ADD | {"function": {**ADD["function"], "description": ""}}]
        restored = continue_(r)
    assert restored == original
    jsonschema.validate(json.loads(original[0]), PERSON)  # not cut by max_tokens
