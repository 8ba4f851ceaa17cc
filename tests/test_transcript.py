"""The chat transcript: what it feeds is the whole conversation's rendering, turn by turn, while it
renders and keeps only the end of the conversation."""
import numpy as np
import pytest

from infmllm_gguf import StreamSession
from infmllm_gguf.chat import ChatTranscript
from infmllm_gguf.runtime import Model


class ChatML:
    """A chat template in Python (ChatML, as SmolLM2's), counting what it is asked to render."""

    def __init__(self):
        self.rendered: list[int] = []

    def __call__(self, messages, add_assistant):
        self.rendered.append(len(messages))
        text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
        return text + ("<|im_start|>assistant\n" if add_assistant else "")


def converse(transcript, rounds, *, system=None, media_every=0):
    """Drive `transcript` as a session does; return the text fed and the messages of the whole chat."""
    fed, messages = "", ([("system", system)] if system else [])
    for i in range(rounds):
        if media_every and i % media_every == 0:
            new = transcript.user_turn(f"<media {i}>", system=system, add_assistant=False)
            fed += new
            transcript.record_fed(new)
            messages.append(("user", f"<media {i}>"))
        new = transcript.user_turn(f"question {i}", system=system)
        fed += new
        transcript.record_fed(new)
        reply = f"answer {i}" * (i % 3)  # an empty reply too
        transcript.reply(reply)
        fed += reply
        messages += [("user", f"question {i}"), ("assistant", reply)]
    return fed, messages


@pytest.mark.parametrize("system, media_every", [(None, 0), ("Be brief.", 0), ("Be brief.", 3)])
def test_what_is_fed_is_the_whole_conversation(system, media_every):
    template = ChatML()
    fed, messages = converse(ChatTranscript(template), 50, system=system, media_every=media_every)
    whole = ChatML()(messages, False)
    # the last reply's end-of-turn is fed with the next turn, so the stream stops just before it
    assert fed == whole.removesuffix("<|im_end|>\n")


def test_a_turn_costs_the_same_at_round_100000_as_at_round_10():
    template = ChatML()
    transcript = ChatTranscript(template)
    converse(transcript, 10, system="Be brief.")
    early, size_early = max(template.rendered), len(repr(transcript.state()[0]))
    converse(transcript, 100_000, system="Be brief.")
    assert max(template.rendered) == early <= 4       # never more than system + one round + the new turn
    # the same last two rounds but for their numbers: 4 more digits, 8 times
    assert len(transcript.state()[0]["last"]) == 4 and len(repr(transcript.state()[0])) == size_early + 32


def test_the_real_template_feeds_what_rendering_the_whole_chat_gives(default_model):
    """SmolLM2's template through llama.cpp: twenty rounds fed turn by turn equal the whole
    conversation rendered at once."""
    with Model(default_model) as model:
        fed, messages = converse(ChatTranscript(model.render_chat), 20, system="You are terse.")
        assert fed == model.render_chat(messages, False).removesuffix("<|im_end|>\n")


def test_a_chat_keeps_its_saved_state_bounded(default_model, tmp_path):
    """120 rounds in a 512-cell cache (about seven budgets of chat): every reply, the cache in budget,
    and a save after round 120 no bigger than after round 30 (the chat history is not in it; the
    memory, off here, keeps it by design, 12 bytes a token up to its cap: tests/test_memory.py)."""
    rng = np.random.default_rng(0)
    sizes = {}
    with StreamSession(default_model, budget=512, chunk=128, memory=False) as s:
        for i in range(1, 121):
            a, b = rng.integers(1, 100, 2)
            reply = s.chat(f"Round {i}: what is {a} plus {b}?", max_tokens=6, temperature=0.0)
            assert reply.strip(), f"empty reply in round {i}"
            assert s.runtime.n_cached() <= 512
            if i in (30, 120):  # the cache is full from round 20 on
                sizes[i] = s.save(tmp_path / f"round{i}.npz").stat().st_size
        assert s.stats.evictions > 10
        print(f"\n120 rounds: {s.stats.tokens_seen} tokens streamed, {s.stats.evictions} evictions, "
              f"saved state {sizes[30]} -> {sizes[120]} bytes, last reply {reply!r}")
    assert s.stats.tokens_seen > 7 * 512
    assert abs(sizes[120] - sizes[30]) < 2048
