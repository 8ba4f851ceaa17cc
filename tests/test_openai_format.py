"""`openai_format`, the shapes and checks the server and `Llama` share: pure functions, no model."""
import pytest

from infmllm_gguf.openai_format import (ROOT, InvalidRequest, chain, check_roles, completion_from_chat_logprobs,
                                        completion_logprobs, delta_choice, error_body, head, logprob_entry,
                                        message_choice, refuse_unsupported, role_chunk, text_choice,
                                        usage)


def test_the_chain_finds_a_prefix_and_continues_from_it():
    parts = [b"user\0hi", b"assistant\0hello", b"user\0again"]
    whole = chain(parts)
    assert whole[0] == ROOT and len(whole) == 4 and len(set(whole)) == 4
    assert chain(parts[:2]) == whole[:3]  # a prefix has the digests of the whole's first messages
    assert chain(parts[2:], start=whole[2]) == whole[2:]  # continued from a conversation's own digest
    assert chain([b"user\0hi!"])[1] != whole[1]


@pytest.mark.parametrize("roles, strict, error", [
    (["system", "user"], True, None),
    (["user", "assistant", "user"], True, None),
    (["user", "system", "user"], True, "messages\\[1\\]: a system message goes first"),
    (["assistant", "user"], True, "messages\\[0\\]: an assistant message answers a user message"),
    (["assistant", "user"], False, None),  # llama-cpp-python renders any order
    (["user", "assistant"], True, "the last message must be the user's"),
    ([], True, "the last message must be the user's"),
])
def test_message_roles(roles, strict, error):
    if error is None:
        check_roles(roles, assistant_answers_user=strict)
        return
    with pytest.raises(InvalidRequest, match=error) as info:
        check_roles(roles, assistant_answers_user=strict)
    assert isinstance(info.value, ValueError) and info.value.param.startswith("messages[")


def test_unsupported_options_are_refused_when_set():
    defaults = {"echo": False, "best_of": 1, "tools": None}
    says = lambda name, value: f"{name}={value!r} is not here"  # noqa: E731
    refuse_unsupported({"echo": False, "best_of": 1, "tools": [], "user": "x"}, defaults, says)
    with pytest.raises(InvalidRequest, match="best_of=2 is not here") as info:
        refuse_unsupported({"best_of": 2}, defaults, says)
    assert (info.value.param, info.value.code) == ("best_of", "unsupported")


def test_the_shapes_of_a_reply():
    h = head("chatcmpl-1", "chat.completion", "m", created=5.9)
    assert h == {"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m"}
    assert usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert message_choice("hi", "stop", None) == {"index": 0, "message": {"role": "assistant", "content": "hi"},
                                                  "logprobs": None, "finish_reason": "stop"}
    assert delta_choice("hi", None, None)["delta"] == {"content": "hi"}
    assert delta_choice(None, "length", None)["delta"] == {}
    assert role_chunk(h)["choices"][0]["delta"] == {"role": "assistant"}
    assert role_chunk(h, "")["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert set(text_choice("x", None, None)) == {"text", "index", "logprobs", "finish_reason"}
    assert error_body("no", param="p", code="c") == {"error": {"message": "no", "type": "invalid_request_error",
                                                               "param": "p", "code": "c"}}


def test_logprobs_in_both_forms():
    entries = [{**logprob_entry("Hé".encode(), -0.5), "top_logprobs": [logprob_entry("Hé".encode(), -0.5),
                                                                       logprob_entry(b"Ho", -1.5)]},
               {**logprob_entry(b"!", -0.1), "top_logprobs": [logprob_entry(b"!", -0.1)]}]
    assert entries[0]["bytes"] == list("Hé".encode()) and entries[0]["token"] == "Hé"
    legacy = completion_from_chat_logprobs(entries, offset=10)
    assert legacy == {"tokens": ["Hé", "!"], "text_offset": [10, 12], "token_logprobs": [-0.5, -0.1],
                      "top_logprobs": [{"Hé": -0.5, "Ho": -1.5}, {"!": -0.1}]}
    assert completion_logprobs([], [], []) == {"tokens": [], "text_offset": [], "token_logprobs": [],
                                               "top_logprobs": []}
    assert logprob_entry(b"\xff", -1.0)["token"] == "\ufffd"  # a token that ends mid-character
