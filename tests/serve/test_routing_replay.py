"""Routing replay through the real server: `moekit.return_routed_experts` records each token's
experts per MoE layer, and `moekit.routed_experts` forces a recorded routing on a later
request, reproducing the recorded logprobs; bad routings are a 400 naming the problem."""

import base64
import json
import re

import httpx
import numpy as np
import pytest
import torch

from moekit.infer.routing_replay import decode_routing, encode_routing

PROMPT = "The history of the city"
NUM_EXPERTS, MOE_LAYERS = 8, 2  # the tiny model's


def post(url, body, path="completions"):
    return httpx.post(f"{url}/v1/{path}", json={"model": "tiny", **body}, timeout=120)


def record(url, **extra):
    """A sampled completion with its logprobs, generated ids and recorded routing."""
    body = {"prompt": PROMPT, "max_tokens": 12, "logprobs": 0, "ignore_eos": True,
            "temperature": 1.0, "seed": 7,
            "moekit": {"return_routed_experts": True, "routing": True, **extra}}  # fmt: skip
    r = post(url, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = [t["token_id"] for t in choice["moekit"]["routing"]]
    return choice, ids, r.json()["usage"]["prompt_tokens"]


def routing_of(choice):
    return decode_routing(choice["moekit"]["routed_experts"], num_experts=NUM_EXPERTS)


def test_recorded_routing_has_a_row_per_token_read_and_matches_the_routing_shown(server):
    url, _ = server
    choice, ids, prompt_tokens = record(url)
    routed = choice["moekit"]["routed_experts"]
    assert routed["dtype"] == "uint8"
    assert routed["shape"] == [prompt_tokens + len(ids) - 1, MOE_LAYERS, 2]
    experts = routing_of(choice)
    # The per-token routing the server already shows (heaviest first) names the same experts.
    for t, token in enumerate(choice["moekit"]["routing"][:-1]):
        for j, layer in enumerate(sorted(token["layers"], key=int)):
            shown = sorted(e for e, _ in token["layers"][layer])
            assert sorted(experts[prompt_tokens + t, j].tolist()) == shown


def test_scoring_prompt_plus_completion_with_the_recorded_routing_reproduces_its_logprobs(
    server, reference
):
    url, _ = server
    # Recorded with one expert per token; the model's own choice would be two.
    choice, ids, prompt_tokens = record(url, top_k=1)
    recorded = choice["logprobs"]["token_logprobs"]
    full = [*reference.tokenizer.encode_prompt(PROMPT), *ids]
    assert len(full) == prompt_tokens + len(ids)
    score = {"prompt": full, "max_tokens": 0, "echo": True, "logprobs": 0}
    replayed = post(url, {**score, "moekit": {"routed_experts": choice["moekit"]["routed_experts"],
                                              "return_routed_experts": True}})  # fmt: skip
    assert replayed.status_code == 200, replayed.text
    got = replayed.json()["choices"][0]["logprobs"]["token_logprobs"][prompt_tokens:]
    assert got == pytest.approx(recorded, abs=2e-6)
    # It read the recorded routing (one expert, the second slot empty) on the recorded rows
    # and routed the last token itself (two experts); without the replay the logprobs differ.
    again, rows = routing_of(replayed.json()["choices"][0]), prompt_tokens + len(ids) - 1
    assert again.shape == (rows + 1, MOE_LAYERS, 2)
    assert torch.equal(again[:rows, :, :1], routing_of(choice))
    assert (again[:rows, :, 1] == -1).all() and (again[rows] >= 0).all()
    plain = post(url, score).json()["choices"][0]["logprobs"]["token_logprobs"][prompt_tokens:]
    assert max(abs(a - b) for a, b in zip(plain, recorded, strict=True)) > 1e-3


def test_a_seeded_rerun_with_the_recorded_routing_is_the_recorded_generation_exactly(server):
    url, _ = server
    choice, ids, _ = record(url, top_k=1)
    body = {"prompt": PROMPT, "max_tokens": 12, "logprobs": 0, "ignore_eos": True,
            "temperature": 1.0, "seed": 7, "moekit": {"routing": True, "return_routed_experts":
            True, "routed_experts": choice["moekit"]["routed_experts"]}}  # fmt: skip
    rerun = post(url, body).json()["choices"][0]
    assert [t["token_id"] for t in rerun["moekit"]["routing"]] == ids
    assert rerun["logprobs"]["token_logprobs"] == choice["logprobs"]["token_logprobs"]
    assert rerun["moekit"]["routed_experts"] == choice["moekit"]["routed_experts"]


def test_a_routing_of_the_prompt_only_leaves_the_generated_tokens_to_the_model(server):
    url, _ = server
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "moekit": {"return_routed_experts": True}}  # fmt: skip
    plain = post(url, body).json()["choices"][0]
    experts = routing_of(plain)
    prompt_rows = experts.shape[0] - 5
    forced = encode_routing(experts[:prompt_rows], NUM_EXPERTS)
    replay = post(
        url, {**body, "moekit": {"return_routed_experts": True, "routed_experts": forced}}
    )
    again = replay.json()["choices"][0]
    assert again["text"] == plain["text"]
    assert again["logprobs"]["token_logprobs"] == plain["logprobs"]["token_logprobs"]
    assert torch.equal(routing_of(again), experts)


def test_streaming_sends_the_routing_on_the_last_chunk_of_each_choice(server):
    url, _ = server
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "n": 2,
            "ignore_eos": True, "moekit": {"return_routed_experts": True}}  # fmt: skip
    whole = post(url, body).json()["choices"]
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      timeout=120) as r:  # fmt: skip
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert all("moekit" not in c for c in mine[:-1])
        assert mine[-1]["finish_reason"] == "length"
        assert mine[-1]["moekit"]["routed_experts"] == whole[i]["moekit"]["routed_experts"]


def test_chat_with_the_openai_client(client):
    extra = {"moekit": {"return_routed_experts": True}}
    messages = [{"role": "user", "content": "Tell me about rivers"}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                           temperature=0, logprobs=True, extra_body=extra)  # fmt: skip
    routed = first.choices[0].model_extra["moekit"]["routed_experts"]
    assert routed["shape"][1:] == [MOE_LAYERS, 2]
    again = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
        extra_body={"moekit": {"routed_experts": routed, "return_routed_experts": True}},
    )  # fmt: skip
    assert again.choices[0].message.content == first.choices[0].message.content
    assert [t.logprob for t in again.choices[0].logprobs.content] == [
        t.logprob for t in first.choices[0].logprobs.content
    ]
    assert again.choices[0].model_extra["moekit"]["routed_experts"] == routed


def b64(values, dtype="uint8"):
    return base64.b64encode(np.array(values, dtype=dtype).tobytes()).decode()


GOOD = {"shape": [2, 2, 1], "dtype": "uint8", "data": b64([0, 1, 2, 3])}
BAD = [
    ({**GOOD, "shape": [2, 3, 1], "data": b64([0] * 6)}, r"this model has 2 MoE layers"),
    ({**GOOD, "shape": [1, 2, 9], "data": b64([0] * 18)},
     r"gives 9 experts per token: this model's router gives 1..8"),
    ({**GOOD, "data": b64([0, 1, 2, 8])}, r"expert id 8: this model's experts are 0..7"),
    ({**GOOD, "data": "not base64!"}, r"routed_experts.data is not valid base64"),
    ({**GOOD, "dtype": "float32"}, r"dtype must be 'uint8' or 'uint16'"),
    ({**GOOD, "data": b64([0, 1, 2])}, r"holds 3 bytes, but shape \[2, 2, 1\] of uint8 needs 4"),
    ({**GOOD, "shape": [400, 2, 1], "data": b64([0] * 800)}, r"has 400 rows, but this request reads"),
    ({"shape": [2, 2, 1]}, r"missing \['dtype', 'data'\]"),
    ("0,1,2,3", r"must be an object"),
]  # fmt: skip


@pytest.mark.parametrize(("routed", "message"), BAD)
def test_bad_routings_are_a_400_naming_the_problem_and_the_server_keeps_serving(
    server, routed, message
):
    url, _ = server
    body = {
        "prompt": PROMPT,
        "max_tokens": 3,
        "ignore_eos": True,
        "moekit": {"routed_experts": routed},
    }
    r = post(url, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "moekit.routed_experts"
    assert re.search(message, error["message"]), error["message"]
    ok = post(url, {**body, "moekit": {"routed_experts": GOOD}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_replaying_and_plain_requests_batched_together_each_get_their_own_answer(server):
    from concurrent.futures import ThreadPoolExecutor

    url, engine = server
    choice, ids, _ = record(url, top_k=1)
    replay = {"prompt": PROMPT, "max_tokens": 12, "logprobs": 0, "ignore_eos": True,
              "temperature": 1.0, "seed": 7, "moekit": {"routing": True,
              "routed_experts": choice["moekit"]["routed_experts"]}}  # fmt: skip
    plain = {"prompt": "A river runs", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
             "logprobs": 0}  # fmt: skip
    alone = post(url, plain).json()["choices"][0]
    steps, rows = engine.stats.decode_steps, engine.stats.batched_tokens
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, url, body) for body in (plain, replay, plain, replay)]
        answers = [f.result().json()["choices"][0] for f in futures]
    # 104 tokens in fewer steps: requests were decoded together.
    assert engine.stats.decode_steps - steps < engine.stats.batched_tokens - rows
    for answer in answers[0::2]:
        assert answer["text"] == alone["text"]
        assert answer["logprobs"]["token_logprobs"] == pytest.approx(
            alone["logprobs"]["token_logprobs"], abs=1e-5
        )
    for answer in answers[1::2]:
        assert [t["token_id"] for t in answer["moekit"]["routing"]] == ids
        assert answer["logprobs"]["token_logprobs"] == pytest.approx(
            choice["logprobs"]["token_logprobs"], abs=1e-5
        )
