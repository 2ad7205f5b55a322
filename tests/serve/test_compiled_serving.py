"""`moekit serve --compile`: decode steps through the compiled graph give the answers, routing
traces and recorded routing of the eager engine, alone and batched, and the steps the graph
does not cover (per-request experts, speculative drafts, a model it cannot compile) run
eagerly."""

import concurrent.futures
import shutil

import httpx
import pytest

from moekit import build_model
from moekit.config import ModelConfig
from moekit.model_dir import save_model
from moekit.serve.compiled_step import batch_sizes

from .conftest import running_server, serve_command

PROMPTS = ["The history of the city", "def main():", "12 + 30 ="]


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    options = dict(max_batch=2, max_queue=8, max_tokens_limit=64)
    with (
        running_server(tiny_model_dir, **options) as eager,
        running_server(tiny_model_dir, compile=True, **options) as compiled,
    ):
        assert compiled[1].compiled is not None
        compiled[1].compiled.warm_up()  # before the engine's first step, as serve does
        yield eager, compiled


def complete(url, prompt, model="tiny", **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "ignore_eos": True,
            "temperature": 0.0, "moekit": {"routing": True}, **extra}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def same_routing(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["token_id"] == y["token_id"]
        for layer, pairs in x["layers"].items():
            other = y["layers"][layer]
            assert [e for e, _ in pairs] == [e for e, _ in other]
            assert [w for _, w in pairs] == pytest.approx([w for _, w in other], abs=1e-4)


def test_compiled_steps_answer_as_the_eager_engine(servers):
    (eager, _), (url, engine) = servers
    before = engine.compiled.steps
    for prompt in PROMPTS:
        want, got = complete(eager, prompt), complete(url, prompt)
        assert got["text"] == want["text"]
        same_routing(got["moekit"]["routing"], want["moekit"]["routing"])
    # one step per token: a token's routing trace comes from the step that reads it
    assert engine.compiled.steps - before == len(PROMPTS) * 8
    metrics = httpx.get(f"{url}/metrics").text
    assert f"moekit_compiled_decode_steps_total {engine.compiled.steps}" in metrics


def test_the_default_cpp_driven_step_answers_as_the_eager_engine(
    servers, tiny_model_dir, monkeypatch
):
    """The other tests here run the graph driven by Python (quicker to compile, see
    conftest.py); a server's default is the C++-driven graph, with its routing outputs."""
    monkeypatch.setenv("MOEKIT_CPP_WRAPPER", "1")
    (eager, _), _ = servers
    options = dict(max_batch=1, max_queue=8, max_tokens_limit=64)
    with running_server(tiny_model_dir, compile=True, **options) as (url, engine):
        assert engine.compiled.decoder._cpp
        want, got = complete(eager, PROMPTS[0]), complete(url, PROMPTS[0])
        assert engine.compiled.steps == 8
        assert engine.compiled.decoder._cpp  # it ran C++-driven: no fallback to Python
    assert got["text"] == want["text"]
    same_routing(got["moekit"]["routing"], want["moekit"]["routing"])


def test_batched_and_sampled_requests_match_the_eager_engine(servers):
    (eager, _), (url, engine) = servers
    # long enough that the two requests surely share decode steps
    sampled = {"temperature": 1.0, "seed": 5, "logprobs": 0, "max_tokens": 48}
    want = [complete(eager, p, **sampled) for p in PROMPTS[:2]]
    # Sent together, the two requests share steps unless the machine delays one past the
    # other's last token (seen once beside other work on 2 cores): up to three tries.
    for _ in range(3):
        steps, rows = engine.stats.decode_steps, engine.stats.batched_tokens
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: complete(url, p, **sampled), PROMPTS[:2]))
        for w, g in zip(want, got, strict=True):
            assert g["text"] == w["text"]
            assert g["logprobs"]["token_logprobs"] == pytest.approx(
                w["logprobs"]["token_logprobs"], abs=1e-4
            )
        if engine.stats.batched_tokens - rows > engine.stats.decode_steps - steps:
            break  # some steps held two rows
    else:
        pytest.fail("no decode step held both requests in three tries")


def test_per_request_experts_and_recorded_routing_match_eagerly(servers):
    (eager, _), (url, engine) = servers
    before = engine.compiled.steps
    one = {"moekit": {"routing": True, "top_k": 1}}
    want, got = complete(eager, PROMPTS[0], **one), complete(url, PROMPTS[0], **one)
    assert got["text"] == want["text"]
    same_routing(got["moekit"]["routing"], want["moekit"]["routing"])
    assert engine.compiled.steps == before  # another number of experts: the eager step
    record = {"moekit": {"return_routed_experts": True}}
    want, got = complete(eager, PROMPTS[1], **record), complete(url, PROMPTS[1], **record)
    assert got["moekit"]["routed_experts"] == want["moekit"]["routed_experts"]


def test_a_model_the_graph_does_not_cover_serves_eagerly(tmp_path, tiny_model_dir):
    shutil.copyfile(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = ModelConfig.from_dict(
        dict(vocab_size=512, dim=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_hidden=64,
             max_seq_len=64, attention=dict(sliding_window=8),
             moe=dict(num_experts=4, top_k=2, expert_hidden=32))
    )  # fmt: skip
    save_model(build_model(cfg, seed=0), cfg, tmp_path)
    with running_server(tmp_path, compile=True, max_batch=2) as (url, engine):
        heard: list[str] = []
        engine.compiled.warm_up(heard.append)
        assert heard and "compiled decoding is off" in heard[-1] and "sliding" in heard[-1]
        assert complete(url, PROMPTS[0])["text"]
        assert engine.compiled.steps == 0


def test_batch_sizes_cover_every_batch_with_a_few_graphs():
    assert batch_sizes(1) == [1]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(6) == [1, 2, 4, 6]


def test_the_serve_command_compiles_before_it_answers(tiny_model_dir):
    import signal

    flags = ("--max-batch", "1", "--compile")
    with serve_command(tiny_model_dir, *flags, start_timeout=300) as (url, server):
        assert complete(url, PROMPTS[0], model=tiny_model_dir.name)["text"]
        metrics = httpx.get(f"{url}/metrics").text
        assert "moekit_compiled_decode_steps_total 8" in metrics
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        log = server.stderr.read() if server.stderr else ""
    assert log.index("compiled the decode step for 1 rows") < log.index("serving ")


def test_speculation_beside_compiled_steps_keeps_the_greedy_answer(servers, tiny_model_dir):
    (eager, _), _ = servers
    prompts = ["a b a b a b a", "The cat sat on the mat. The cat"]
    plain = {"moekit": {}, "max_tokens": 40}  # a routing trace would turn drafting off
    want = [complete(eager, p, **plain)["text"] for p in prompts]
    with running_server(tiny_model_dir, compile=True, max_batch=1,
                        speculative_tokens=3) as (url, engine):  # fmt: skip
        engine.compiled.warm_up()
        got = [complete(url, p, **plain)["text"] for p in prompts]
        assert engine.stats.drafted_tokens > 0  # some steps checked drafts (eagerly)
        assert engine.compiled.steps > 0  # and the others ran compiled
    assert got == want
