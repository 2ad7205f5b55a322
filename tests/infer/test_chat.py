"""ChatSession: a conversation that remembers its turns and forgets the oldest when the
model's context is full."""

import pytest

from moekit.infer.chat import ChatSession, ChatTemplate
from moekit.infer.generate import ContextLengthError, Generator
from moekit.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir, device="cpu")


def session(generator, **kw):
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    return ChatSession(generator, params, template=ChatTemplate(), **kw)


def test_a_reply_streams_and_both_turns_are_remembered(generator):
    chat = session(generator, system="be brief")
    pieces = list(chat.send("hello"))
    reply = "".join(pieces)
    # The reply is what the model gives the formatted conversation, stopped at a new turn.
    expected = generator.generate(
        chat.template.format([{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "hello"}]),
        SamplingParams(max_new_tokens=8, temperature=0.0, stop=list(chat.template.stop)),
    )[0].text  # fmt: skip
    assert reply == expected
    roles = [m["role"] for m in chat.history]
    assert roles == (["system", "user", "assistant"] if reply.strip() else ["system", "user"])
    chat.reset()
    assert chat.history == [{"role": "system", "content": "be brief"}]


def test_the_oldest_exchange_is_forgotten_when_the_context_is_full(generator):
    chat = session(generator, system="s")
    # A message that fits the context (128 tokens, 8 of them for the reply) once, not twice.
    fits = generator.max_seq_len - 8
    long = "list tuple "
    while (
        len(generator.encode(chat.template.format([{"role": "user", "content": long}]))) < fits // 2
    ):
        long += "list tuple "
    chat.history += [{"role": "user", "content": long}, {"role": "assistant", "content": long}]
    chat.history += [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    list(chat.send(long))
    assert chat.history[0] == {"role": "system", "content": "s"}
    assert chat.history[1] == {"role": "user", "content": "a"}  # the long exchange went first
    assert chat.history[-1]["role"] in ("user", "assistant")


def test_a_message_too_long_alone_is_refused_and_not_remembered(generator):
    chat = session(generator)
    with pytest.raises(ContextLengthError):
        list(chat.send("tuple " * 200))
    assert chat.history == []
