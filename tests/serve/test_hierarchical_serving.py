"""A hierarchical-routing model behind the real server: the routing trace names ordinary global
expert ids (inside each token's chosen groups), per-request top_k works, and a recorded
routing replays to the same logprobs."""

import shutil

import httpx
import pytest

from moekit import build_model
from moekit.config import ModelConfig
from moekit.infer.routing_replay import decode_routing
from moekit.model_dir import save_model

from .conftest import running_server

HIER = dict(vocab_size=512, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=128,
            max_seq_len=128,
            moe=dict(num_experts=8, top_k=4, expert_hidden=64, router="hierarchical",
                     router_groups=4, group_top_k=2))  # fmt: skip
PROMPT = "The history of the city"


@pytest.fixture(scope="module")
def hier_server(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("hier-serve")
    shutil.copyfile(tiny_model_dir / "tokenizer.json", out / "tokenizer.json")
    cfg = ModelConfig.from_dict(HIER)
    save_model(build_model(cfg, seed=0), cfg, out)
    with running_server(out, max_batch=4, max_queue=16, max_tokens_limit=64) as s:
        yield s


def post(url, body):
    return httpx.post(f"{url}/v1/completions", json={"model": "tiny", **body}, timeout=120)


def test_the_routing_trace_names_global_experts_in_two_groups(hier_server):
    url, _ = hier_server
    body = {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True, "temperature": 0.0,
            "moekit": {"routing": True}}  # fmt: skip
    r = post(url, body)
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["moekit"]["routing"]
    assert len(tokens) == 6
    for token in tokens:
        for layer in token["layers"].values():
            experts = [e for e, _ in layer]
            assert len(set(experts)) == 4 and all(0 <= e < 8 for e in experts)
            assert len({e // 2 for e in experts}) == 2  # 2 groups of 2 experts each
    one = post(url, {**body, "moekit": {"routing": True, "top_k": 1}})
    assert one.status_code == 200, one.text
    for token in one.json()["choices"][0]["moekit"]["routing"]:
        assert all(len(layer) == 1 for layer in token["layers"].values())


def test_a_recorded_routing_replays_to_the_same_logprobs(hier_server):
    url, _ = hier_server
    body = {"prompt": PROMPT, "max_tokens": 8, "logprobs": 0, "ignore_eos": True,
            "temperature": 1.0, "seed": 3, "moekit": {"return_routed_experts": True}}  # fmt: skip
    r = post(url, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    routed = decode_routing(choice["moekit"]["routed_experts"], num_experts=8)
    assert routed.shape[1:] == (2, 4)
    again = post(url, {**body, "moekit": {"routed_experts": choice["moekit"]["routed_experts"]}})
    assert again.status_code == 200, again.text
    replayed = again.json()["choices"][0]
    assert replayed["text"] == choice["text"]
    assert replayed["logprobs"]["token_logprobs"] == pytest.approx(
        choice["logprobs"]["token_logprobs"], abs=2e-6
    )
