"""Experts paged from the weight files under a memory budget: same outputs, a real budget."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit import build_model
from moekit.config import ModelConfig
from moekit.infer.generate import Generator
from moekit.infer.offload import (
    OffloadConfig,
    load_paged_model,
    offload_report,
    parse_size,
    plan_budget,
)
from moekit.infer.sampling import SamplingParams
from moekit.model import meta_model
from moekit.model_dir import ModelDir, load_model, save_model
from moekit.quant.build import meta_model as qmeta_model

SRC = Path(__file__).resolve().parents[2] / "src"
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.mark.parametrize(
    ("text", "size"),
    [("6GiB", 6 * 2**30), ("500MB", 500 * 10**6), ("1.5G", 3 * 2**29), ("4096", 4096),
     ("64 kib", 65536), ("2TB", 2 * 10**12)],
)  # fmt: skip
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["6XB", "", "GiB", "-1GiB", "0", "1e9"])
def test_a_malformed_size_names_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"not a memory size.*KB, MB, GB.*KiB, MiB, GiB"):
        parse_size(text)


def _minimum(model_dir: Path) -> int:
    return plan_budget(qmeta_model(ModelDir(model_dir).config()), 2**62).minimum


def _budget(model_dir: Path, slots: int) -> int:
    plan = plan_budget(qmeta_model(ModelDir(model_dir).config()), 2**62)
    return plan.resident + slots * sum(plan.expert.values())


@pytest.mark.parametrize(
    ("slots", "policy", "prefetch"),
    [(8, "lru", True), (3, "lru", True), (3, "lru", False), (1, "lfu", True), (2, "lfu", False)],
)
def test_paged_model_gives_the_resident_models_logits_and_tokens(
    tiny_model_dir, slots, policy, prefetch
):
    offload = OffloadConfig(
        max_memory=_budget(tiny_model_dir, slots), policy=policy, prefetch=prefetch
    )
    paged = Generator.from_dir(tiny_model_dir, device="cpu", offload=offload)
    full = Generator.from_dir(tiny_model_dir, device="cpu")
    assert offload_report(paged.model)["slots_per_layer"] == slots  # type: ignore[index]
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a prompt needs more experts than the slots hold: computed in rounds
        want = full.model(tokens, causal_routing=True).logits
        got = paged.model(tokens, causal_routing=True).logits
    assert torch.equal(got, want)
    prompts = ["The history of", "Water boils at"]
    want_ids = [c.token_ids for c in full.generate(prompts, GREEDY)]
    assert [c.token_ids for c in paged.generate(prompts, GREEDY)] == want_ids
    report = offload_report(paged.model)
    assert report is not None and report["bytes_read"] > 0
    assert 0 <= report["hit_rate"] <= 1 and len(report["layers"]) == 2
    if prefetch:
        assert report["prefetch_accuracy"] is not None
    if slots == 8:  # every expert fits: each is read once at most
        assert report["bytes_read"] <= report["cache_bytes"] * 2  # a prefetch may also read


def test_a_budget_below_the_minimum_is_refused_with_the_minimum(tiny_model_dir):
    minimum = _minimum(tiny_model_dir)
    with pytest.raises(ValueError, match=rf"too small .* at least .*\({minimum} bytes\)"):
        load_paged_model(tiny_model_dir, OffloadConfig(max_memory=minimum - 1))
    model = load_paged_model(tiny_model_dir, OffloadConfig(max_memory=minimum))
    assert offload_report(model)["slots_per_layer"] == 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("bits", "only", "slots", "prefetch"),
    [(8, "experts", 2, True), (4, "all", 3, False), (4, "experts", 1, True)],
)
def test_quantised_experts_page_with_the_loaded_models_outputs(
    tiny_model_dir, tmp_path, bits, only, slots, prefetch
):
    """A slot holds an expert's packed weights, scales and minimums: prompts (in rounds),
    decode steps and greedy tokens equal the quantised model loaded whole."""
    from moekit import quantize

    qdir = tmp_path / f"int{bits}"
    quantize(tiny_model_dir, qdir, bits=bits, only=only)
    offload = OffloadConfig(max_memory=_budget(qdir, slots), prefetch=prefetch)
    paged = Generator.from_dir(qdir, device="cpu", offload=offload)
    full = Generator.from_dir(qdir, device="cpu")
    report = offload_report(paged.model)
    assert report is not None and report["slots_per_layer"] == slots
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = full.model(tokens, causal_routing=True).logits
        assert torch.equal(paged.model(tokens, causal_routing=True).logits, want)
        step = torch.tensor([[1], [50], [300], [511]])
        want = full.model(step, causal_routing=True).logits
        assert torch.equal(paged.model(step, causal_routing=True).logits, want)
    prompts = ["The history of", "Water boils at"]
    want_ids = [c.token_ids for c in full.generate(prompts, GREEDY)]
    assert [c.token_ids for c in paged.generate(prompts, GREEDY)] == want_ids
    layer = plan_budget(qmeta_model(ModelDir(qdir).config()), 2**62).expert[0]
    float_layer = plan_budget(meta_model(ModelDir(tiny_model_dir).config()), 2**62).expert[0]
    assert layer < float_layer / 3  # a slot holds the packed bytes, not float weights
    assert offload_report(paged.model)["bytes_read"] > 0  # type: ignore[index]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("fault", ["truncated", "missing", "replaced"])
def test_a_weight_file_that_changes_while_paging_is_named_with_the_tensor(
    tiny_model_dir, tmp_path, fault
):
    model_dir = _copy(tiny_model_dir, tmp_path / "m")
    gen = Generator.from_dir(
        model_dir, device="cpu", offload=OffloadConfig(max_memory=_budget(model_dir, 1))
    )
    gen.generate("Hello", SamplingParams(max_new_tokens=2, temperature=0.0))
    weights = model_dir / ModelDir.WEIGHTS
    if fault == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif fault == "missing":
        weights.unlink()
    else:
        data = bytearray(weights.read_bytes())
        weights.unlink()
        weights.write_bytes(bytes(data))  # same size, another file
    pattern = r"model\.safetensors .*tensor 'layers\.\d\.ffn\.experts\.w_(gate|up|down)'"
    with pytest.raises(ValueError, match=pattern):
        gen.generate("A long prompt about many things", SamplingParams(max_new_tokens=8))


def test_generate_json_reports_the_cache_and_malformed_sizes_are_refused(tiny_model_dir):
    from tests.cli.conftest import run

    budget = str(_budget(tiny_model_dir, 2))
    out = run("generate", str(tiny_model_dir), "Hi", "--max-memory", budget, "--json",
              "--max-new-tokens", "4", "--temperature", "0")  # fmt: skip
    report = json.loads(out.stdout)["offload"]
    assert report["slots_per_layer"] == 2 and report["layers"][0]["hits"] >= 0
    bad = run("generate", str(tiny_model_dir), "Hi", "--max-memory", "6XB", check=False)
    assert bad.returncode == 2 and "--max-memory" in bad.stderr and "GiB" in bad.stderr
    small = run("generate", str(tiny_model_dir), "Hi", "--max-memory", "1KB", check=False)
    assert small.returncode != 0 and "at least" in small.stderr and "Traceback" not in small.stderr


BUDGET_SCRIPT = """
import json, sys
from moekit.config import ModelConfig
from moekit.model import meta_model
from moekit.infer.generate import Generator
from moekit.infer.offload import OffloadConfig, offload_report
from moekit.infer.sampling import SamplingParams

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

model_dir, budget, warm_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
meta_model(ModelConfig.from_dict(json.load(open(model_dir + "/config.json"))))
# The runtime: every code path generation takes, warmed up on a tiny model, then freed.
warm = Generator.from_dir(warm_dir, device="cpu", offload=OffloadConfig(max_memory=2**40))
warm.generate("The history of", SamplingParams(max_new_tokens=16, temperature=0.0))
del warm
base = status("VmRSS")
gen = Generator.from_dir(model_dir, device="cpu", offload=OffloadConfig(max_memory=budget))
out = gen.generate("The history of", SamplingParams(max_new_tokens=16, temperature=0.0))
print(json.dumps({"base": base, "peak": status("VmHWM"), "ids": out[0].token_ids,
                  "report": offload_report(gen.model)}))
"""

SLACK = 40 * 2**20  # activations, the KV cache, allocator slack


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_generation_stays_within_the_budget(tiny_model_dir, tmp_path):
    cfg = ModelConfig.from_dict(
        dict(vocab_size=512, dim=256, num_layers=4, num_heads=4, num_kv_heads=2,
             ffn_hidden=512, max_seq_len=128, moe=dict(num_experts=32, top_k=2, expert_hidden=512))
    )  # fmt: skip
    save_model(build_model(cfg, seed=0), cfg, tmp_path)
    shutil.copy(ModelDir(tiny_model_dir).tokenizer_path, tmp_path)
    plan = plan_budget(meta_model(cfg), 2**62)
    expert_bytes = plan.experts_per_layer * sum(plan.expert.values())
    budget = plan.resident + 6 * sum(plan.expert.values())  # 6 of 32 experts per layer
    assert expert_bytes >= 4 * budget
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", BUDGET_SCRIPT, str(tmp_path), str(budget), str(tiny_model_dir)],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["report"]["slots_per_layer"] == 6 and r["report"]["hit_rate"] < 1
    assert r["peak"] - r["base"] <= budget + SLACK, (r["peak"] - r["base"], budget)
    full = Generator(load_model(tmp_path), Generator.from_dir(tiny_model_dir).tokenizer)
    want = full.generate("The history of", SamplingParams(max_new_tokens=16, temperature=0.0))
    assert r["ids"] == want[0].token_ids


def test_the_server_metrics_show_the_cache_per_layer(tiny_model_dir):
    from moekit.serve.metrics import _offload_lines

    model = load_paged_model(tiny_model_dir, OffloadConfig(max_memory=_budget(tiny_model_dir, 2)))
    with torch.no_grad():
        model(torch.arange(10).view(1, 10), causal_routing=True)
    text = "\n".join(_offload_lines(model))
    misses = offload_report(model)["layers"][1]["misses"]  # type: ignore[index]
    assert f'moekit_expert_cache_misses_total{{layer="1"}} {misses}' in text
    assert 'moekit_expert_bytes_read_total{layer="0"}' in text
    assert _offload_lines(load_model(tiny_model_dir)) == []


def test_decode_steps_give_the_loaded_models_logits(tiny_model_dir):
    """One token per row takes the loaded model's decode path and the paged model's cache."""
    full = load_model(tiny_model_dir).eval()
    paged = load_paged_model(tiny_model_dir, OffloadConfig(max_memory=_budget(tiny_model_dir, 2)))
    with torch.no_grad():
        for tokens in (torch.tensor([[7]]), torch.tensor([[1], [50], [300], [511]])):
            want = full(tokens, causal_routing=True).logits
            assert torch.equal(paged.eval()(tokens, causal_routing=True).logits, want)


def test_a_quantised_weight_file_that_changes_while_paging_is_named_with_the_tensor(
    tiny_model_dir, tmp_path
):
    from moekit import quantize

    qdir = tmp_path / "int4"
    quantize(tiny_model_dir, qdir, bits=4)
    gen = Generator.from_dir(qdir, device="cpu", offload=OffloadConfig(max_memory=_budget(qdir, 1)))
    gen.generate("Hello", SamplingParams(max_new_tokens=2, temperature=0.0))
    weights = qdir / ModelDir.WEIGHTS
    os.truncate(weights, weights.stat().st_size // 2)
    pattern = r"model\.safetensors .*tensor 'layers\.\d\.ffn\.experts\.w_(gate|up|down)\.qweight'"
    with pytest.raises(ValueError, match=pattern):
        gen.generate("A long prompt about many things", SamplingParams(max_new_tokens=8))
