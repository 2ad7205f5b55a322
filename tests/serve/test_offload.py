"""The server with experts paged under a memory budget (--max-memory)."""

from concurrent.futures import ThreadPoolExecutor

import httpx

from moekit.infer.offload import OffloadConfig, plan_budget
from moekit.model import meta_model
from moekit.model_dir import ModelDir
from tests.serve.conftest import greedy, running_server


def test_a_paged_server_answers_as_the_loaded_model_and_reports_its_cache(
    tiny_model_dir, reference
):
    plan = plan_budget(meta_model(ModelDir(tiny_model_dir).config()), 2**62)
    offload = OffloadConfig(max_memory=plan.resident + 2 * sum(plan.expert.values()))
    prompts = ["The history of", "Water boils at", "In the beginning", "A list of"]
    with running_server(tiny_model_dir, max_batch=4, offload=offload) as (url, _):

        def ask(prompt: str) -> str:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(4) as pool:  # decoded together, in one batch
            texts = list(pool.map(ask, prompts))
        metrics = httpx.get(f"{url}/metrics").text
    assert texts == [greedy(reference, p, 8) for p in prompts]
    assert 'moekit_expert_cache_slots{layer="0"} 2' in metrics
    assert 'moekit_expert_cache_misses_total{layer="1"}' in metrics
