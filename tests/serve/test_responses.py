"""What the answers hold beyond the text: logprobs, echo, text offsets, the routing
extension."""

import json

import httpx
import pytest

from moekit.infer.generate import Generator

from .conftest import SCORING_PROMPT, running_server

openai = pytest.importorskip("openai")


def test_echo_and_logprobs_for_scoring(client, reference):
    """The request lm-evaluation-harness makes to score a continuation."""
    out = client.completions.create(
        model="tiny", prompt="The cat sat", max_tokens=1, temperature=0, echo=True, logprobs=2
    )
    lp = out.choices[0].logprobs
    prompt_tokens = len(reference.tokenizer.encode("The cat sat"))
    assert out.choices[0].text.startswith("The cat sat")
    assert lp.token_logprobs[0] is None and len(lp.tokens) == prompt_tokens + 1
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    # The logprob of each prompt token equals the library's.
    import torch

    ids = reference.tokenizer.encode("The cat sat")
    with torch.no_grad():
        logits = reference.model(torch.tensor([ids]), causal_routing=True).logits[0]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp.token_logprobs[1:prompt_tokens] == pytest.approx(expected.tolist(), abs=1e-4)


def test_routing_extension_and_experts_per_token(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4, "temperature": 0,
                                                 "ignore_eos": True, "moekit": {"routing": True, "top_k": 1}})  # fmt: skip
    routing = r.json()["choices"][0]["moekit"]["routing"]
    assert len(routing) == r.json()["usage"]["completion_tokens"]
    for token in routing:
        assert set(token["layers"]) == {"0", "1"}
        assert all(
            len(pairs) == 1 and pairs[0][1] == pytest.approx(1.0)
            for pairs in token["layers"].values()
        )
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "moekit": {"top_k": 9}}
    )
    assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]


def test_chat_logprobs_without_top_logprobs(client):
    """`logprobs: true` alone asks for each token's logprob (and no alternatives)."""
    messages = [{"role": "user", "content": "hello"}]
    ask = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
               extra_body={"ignore_eos": True})  # fmt: skip
    out = client.chat.completions.create(**ask)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens > 0
    assert all(e.top_logprobs == [] and e.logprob <= 0 for e in content)
    # `bytes` are each token's own UTF-8 bytes: together they spell the message, even where a
    # token holds part of a character (its text alone is U+FFFD).
    spelled = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    assert spelled.startswith(out.choices[0].message.content)
    streamed = [
        e
        for chunk in client.chat.completions.create(**ask, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])
    assert all(e.top_logprobs == [] for e in streamed)


def test_text_offsets_are_offsets_into_the_text(server):
    """Streamed or not, `text_offset[j]` is where token j's text starts in the choice's text
    (with echo, the prompt's text comes first)."""
    url, _ = server
    body = {"model": "tiny", "prompt": "The cat sat on", "max_tokens": 10, "temperature": 0,
            "echo": True, "logprobs": 1, "ignore_eos": True}  # fmt: skip
    whole = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]
    text, lp = whole["text"], whole["logprobs"]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    prompt_tokens = len(lp["tokens"]) - 10
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        # A token that holds part of a character has no text of its own (it shows as U+FFFD);
        # it gets the offset of the text it turns out to belong to.
        if "\ufffd" not in token:
            assert text[offset:].lstrip("\ufffd").startswith(token), (token, offset, text)
    assert lp["text_offset"][prompt_tokens] == len("The cat sat on")
    streamed: dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": []}
    streamed_text = ""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["logprobs"]:
                for key, values in streamed.items():
                    values += choice["logprobs"][key]
            streamed_text += choice["text"]
    assert streamed_text == text
    assert streamed["tokens"] == lp["tokens"]
    assert streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:])


def test_scoring_when_the_greedy_next_token_is_end_of_text(eos_model_dir):
    """lm-evaluation-harness scores a prompt with max_tokens=1, echo and logprobs, and drops
    the last entry as the generated token: that entry must exist when the model's choice is
    end-of-text, or the score silently loses the prompt's last token."""
    import torch

    with running_server(eos_model_dir) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        out = client.completions.create(model="tiny", prompt=SCORING_PROMPT, max_tokens=1,
                                        temperature=0, echo=True, logprobs=1)  # fmt: skip
    reference = Generator.from_dir(eos_model_dir)
    ids = reference.tokenizer.encode(SCORING_PROMPT)
    with torch.no_grad():
        logits = reference.model(torch.tensor([ids]), causal_routing=True).logits[0]
    logp = torch.log_softmax(logits, -1)
    eos = reference.tokenizer.eos_id
    assert int(logp[-1].argmax()) == eos
    choice, lp = out.choices[0], out.choices[0].logprobs
    assert choice.text == SCORING_PROMPT and choice.finish_reason == "stop"
    assert out.usage.completion_tokens == 1
    assert len(lp.tokens) == len(ids) + 1
    assert lp.tokens[-1] == reference.tokenizer.decode([eos])
    assert lp.token_logprobs[-1] == pytest.approx(float(logp[-1, eos]), abs=1e-4)
    assert lp.text_offset[-1] == len(SCORING_PROMPT)
    expected = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp.token_logprobs[1:-1] == pytest.approx(expected.tolist(), abs=1e-4)
