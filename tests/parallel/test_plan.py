"""The split planner: its figures against hand computations on the debug preset, their trends
over the expert-parallel size, the recommendation, and its errors."""

import json
import math

import pytest

from moekit.config import ModelConfig
from moekit.parallel.plan import ASSUMPTIONS, plan_parallel
from moekit.params import count_params
from moekit.presets import get_preset

# The debug preset by hand: vocab 512, dim 64, 2 layers (both MoE), 4 heads of 16, 2 KV heads,
# 8 SwiGLU experts of hidden 96, top-2, untied embeddings.
D, V, LAYERS, E, K, F = 64, 512, 2, 8, 2, 96
ATTENTION = 4 * 64 * 16 + 2 * 64 * 2 * 16 + 4 * 16 * 64  # q, k, v, o projections
EXPERT = 3 * D * F
EXPERTS = LAYERS * E * EXPERT
TOTAL = 2 * V * D + (2 * LAYERS + 1) * D + LAYERS * (ATTENTION + E * D) + EXPERTS
OTHER = TOTAL - EXPERTS


@pytest.fixture
def debug() -> ModelConfig:
    return get_preset("debug")


def split(plan, ep):
    return next(s for s in plan.splits if s.ep == ep)


def test_the_hand_counts_agree_with_the_accounting(debug):
    counted = count_params(debug)
    assert counted.total == TOTAL
    assert counted.total_by["routed_experts"] == EXPERTS
    plan = plan_parallel(debug, gpus=1)
    assert (plan.params, plan.expert_params, plan.moe_layers) == (TOTAL, EXPERTS, LAYERS)


def test_replicated_memory_is_params_times_bytes(debug):
    # ddp on 4 devices, EP=2: every device holds the non-expert parameters and half the experts.
    plan = plan_parallel(debug, gpus=4, sharding="ddp")
    s = split(plan, 2)
    held = OTHER + EXPERTS // 2
    assert (s.dp, s.experts_per_device) == (2, 4)
    assert s.weights == held * 2 and s.gradients == held * 2  # bf16
    assert s.optimizer == held * 12  # fp32 master + two fp32 moments
    fp32 = split(plan_parallel(debug, gpus=4, sharding="ddp", param_dtype="fp32"), 2)
    assert fp32.optimizer == held * 8  # no master copy for fp32 parameters
    assert split(plan_parallel(debug, gpus=4, sharding="ddp", master_weights=False), 2).optimizer \
        == held * 8  # fmt: skip
    grads32 = split(plan_parallel(debug, gpus=4, sharding="ddp", grad_dtype="fp32"), 2)
    assert grads32.gradients == held * 4 and grads32.weights == held * 2
    # Ring all-reduce of the gradients: 2 (g-1)/g of them, non-expert over 4, experts over DP=2.
    assert s.collective_bytes == round(OTHER * 4 * 3 / 4 + EXPERTS / 2 * 4 * 1 / 2)


def test_fsdp_shards_everything_and_gathers_two_units(debug):
    root = 2 * V * D + D  # embeddings, LM head and final norm: one unit
    block = ATTENTION + 2 * D + E * D  # a block's non-expert parameters
    # 4 devices, EP=2, DP=2: a block gathers its own half of the experts from its DP peer.
    s = split(plan_parallel(debug, gpus=4), 2)
    shard = math.ceil(OTHER / 4) + EXPERTS // 4
    gathered = block + E // 2 * EXPERT
    assert gathered > root
    assert s.weights == (shard + 2 * gathered) * 2  # the running block and the prefetched one
    assert s.gradients == (shard + gathered) * 2
    assert s.optimizer == shard * 12
    # Two all-gathers and one reduce-scatter: non-expert parameters over 4, experts over 2.
    assert s.collective_bytes == round(OTHER * 6 * 3 / 4 + EXPERTS / 2 * 6 * 1 / 2)
    # 2 devices, EP=2, DP=1: the experts are not sharded further, so never gathered.
    s = split(plan_parallel(debug, gpus=2), 2)
    shard = math.ceil(OTHER / 2) + EXPERTS // 2
    assert root > block
    assert s.weights == (shard + root + block) * 2
    assert s.gradients == (shard + root) * 2
    assert s.collective_bytes == round(OTHER * 6 * 1 / 2)
    # 1 device: nothing is sharded, FSDP holds what DDP holds.
    one = plan_parallel(debug, gpus=1).splits[0]
    assert one == plan_parallel(debug, gpus=1, sharding="ddp").splits[0]
    assert one.weights == TOTAL * 2 and one.collective_bytes == 0


def test_all_to_all_bytes_by_hand(debug):
    tokens = 100
    plan = plan_parallel(debug, gpus=4, tokens_per_step=tokens)
    per_exchange = tokens * K * D * 2  # bf16
    for s in plan.splits:
        sent = per_exchange * 2 * 2 * LAYERS * (s.ep - 1) / s.ep  # dispatch+combine, fwd+bwd
        assert s.all_to_all_bytes == round(sent)
    assert split(plan, 1).all_to_all_bytes == 0
    assert split(plan, 2).all_to_all_bytes == 102_400
    # Recomputing blocks repeats the forward exchanges: three passes instead of two.
    again = plan_parallel(debug, gpus=4, tokens_per_step=tokens, activation_checkpointing=True)
    assert split(again, 2).all_to_all_bytes == 153_600


def test_activations_by_hand(debug):
    tokens = 100
    block = 4 * D + (2 * 4 + 2 * 2) * 16  # norm and projection inputs; q, k, v, output
    routed = K * (2 * D + 3 * F)  # per copy: dispatched input, gate/up/product, expert output
    per_layer = (block + routed) * 2 + E * 4  # bf16, plus the router's fp32 probabilities
    logits = V * 4
    plan = plan_parallel(debug, gpus=1, tokens_per_step=tokens)
    assert plan.splits[0].activations == tokens * (LAYERS * per_layer + logits)
    ckpt = plan_parallel(debug, gpus=1, tokens_per_step=tokens, activation_checkpointing=True)
    kept = LAYERS * D * 2 + per_layer  # each block's input, and one block recomputed
    assert ckpt.splits[0].activations == tokens * (kept + logits)
    assert ckpt.splits[0].activations < plan.splits[0].activations
    # Defaults: one sequence of the model's max_seq_len (256 for debug).
    default = plan_parallel(debug, gpus=1)
    assert default.tokens_per_step == default.seq_len == 256
    assert plan_parallel(debug, gpus=1, seq_len=64).tokens_per_step == 64
    assert (
        "longer than the model's max_seq_len=256"
        in plan_parallel(debug, gpus=1, seq_len=512).notes[0]
    )


@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_more_expert_parallelism_holds_fewer_expert_bytes(debug, sharding):
    plan = plan_parallel(debug, gpus=8, sharding=sharding, tokens_per_step=64)
    assert [s.ep for s in plan.splits] == [1, 2, 4, 8]
    assert [s.dp * s.ep for s in plan.splits] == [8] * 4
    for a, b in zip(plan.splits, plan.splits[1:], strict=False):
        assert b.experts_per_device == a.experts_per_device // 2
        assert b.weights < a.weights and b.total < a.total
        assert b.all_to_all_bytes > a.all_to_all_bytes
        assert b.activations == a.activations  # balanced routing: the same copies arrive
        if sharding == "ddp":
            assert b.optimizer < a.optimizer
        else:  # fully sharded: 1/N of every parameter at rest, whatever the split
            assert b.optimizer == a.optimizer


def test_the_recommendation_is_the_cheapest_split_that_fits(debug):
    # Many tokens: the all-to-all dominates, so EP=1 sends the least but needs the most memory.
    kwargs = dict(gpus=8, sharding="ddp", tokens_per_step=100_000)
    roomy = plan_parallel(debug, gpu_memory=2**40, **kwargs)
    assert roomy.best.ep == 1 and all(s.fits for s in roomy.splits)
    tight = plan_parallel(debug, gpu_memory=split(roomy, 2).total, **kwargs)
    assert [s.fits for s in tight.splits] == [False, True, True, True]
    assert tight.best.ep == 2 and "fits" in tight.reason and "DP=4 x EP=2" in tight.reason
    assert tight.best.comm_bytes == min(s.comm_bytes for s in tight.splits if s.fits)
    none = plan_parallel(debug, gpu_memory="1MiB", **kwargs)
    assert not any(s.fits for s in none.splits)
    assert none.best.ep == 8 and none.best.total == min(s.total for s in none.splits)
    assert none.reason.startswith("no split fits in 1.0 MiB per device; DP=1 x EP=8")
    assert none.reason.endswith(
        "shard with fsdp, turn on activation checkpointing, process fewer tokens per step or "
        "use more or larger devices"
    )
    fsdp = plan_parallel(
        debug, gpus=8, gpu_memory="512KiB", tokens_per_step=1, activation_checkpointing=True
    )
    assert fsdp.reason.endswith("needs the least, 1.0 MiB: use more or larger devices")


def test_only_the_divisors_of_both_counts_are_splits(debug):
    assert [s.ep for s in plan_parallel(debug, gpus=12).splits] == [1, 2, 4]
    assert [s.ep for s in plan_parallel(debug, gpus=6, ep=2).splits] == [2]
    dense = ModelConfig.from_dict({**debug.to_dict(), "moe": None})
    plan = plan_parallel(dense, gpus=8)
    assert [(s.dp, s.ep, s.all_to_all_bytes, s.experts_per_device) for s in plan.splits] == [
        (8, 1, 0, 0)
    ]
    assert plan.expert_params == 0 and plan.moe_layers == 0
    # One expert per layer: EP=1 only, but the model has MoE layers.
    one = ModelConfig.from_dict(
        {**debug.to_dict(), "moe": {**debug.moe.to_dict(), "num_experts": 1, "top_k": 1}}
    )
    with pytest.raises(ValueError, match="ep=2 is invalid: it must divide both the 4 devices"):
        plan_parallel(one, gpus=4, ep=2)
    # A million devices: the sizes come from the experts' divisors, at once.
    assert [s.ep for s in plan_parallel(debug, gpus=2**20).splits] == [1, 2, 4, 8]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(gpus=0), "gpus=0 is invalid: must be an integer >= 1"),
        (dict(gpus=2.5), "gpus=2.5 is invalid"),
        (dict(gpus=4, gpu_memory="80 parsecs"), "'80 parsecs' is not a memory size"),
        (dict(gpus=4, gpu_memory="0GiB"), "not a memory size above zero"),
        (dict(gpus=4, gpu_memory=0), "gpu_memory=0 is invalid"),
        (dict(gpus=4, tokens_per_step=0), "tokens_per_step=0 is invalid"),
        (dict(gpus=4, seq_len=-1), "seq_len=-1 is invalid"),
        (dict(gpus=4, ep=3), "ep=3 is invalid: it must divide both the 4 devices and the 8"),
        (dict(gpus=16, ep=16), "valid: 1, 2, 4, 8"),
        (dict(gpus=4, ep=0), "ep=0 is invalid"),
        (dict(gpus=4, param_dtype="fp16"), "param_dtype='fp16' is invalid"),
        (dict(gpus=4, sharding="zero3"), "sharding='zero3' is invalid"),
    ],
)
def test_bad_input_is_named(debug, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan_parallel(debug, **kwargs)


def test_a_model_without_moe_layers_takes_ep_1_only(debug):
    dense = ModelConfig.from_dict({**debug.to_dict(), "moe": None})
    with pytest.raises(ValueError, match="no MoE layers, so ep must be 1"):
        plan_parallel(dense, gpus=4, ep=2)
    assert plan_parallel(dense, gpus=4, ep=1).splits[0].ep == 1


def test_the_plan_is_json(debug):
    plan = plan_parallel(debug, gpus=4, gpu_memory="80GiB", param_dtype="fp32")
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["gpu_memory"] == 80 * 2**30 and data["assumptions"] == ASSUMPTIONS
    assert data["master_weights"] is False  # fp32 parameters need none
    assert data["notes"] and "master copy" in data["notes"][0]
    assert [row["ep"] for row in data["splits"]] == [1, 2, 4]
    row = data["splits"][0]
    assert row["total"] == row["weights"] + row["gradients"] + row["optimizer"] + row["activations"]
    assert row["comm_bytes"] == row["all_to_all_bytes"] + row["collective_bytes"]
    assert data["recommended"] == plan.best.to_dict()
    assert data["splits"][data["recommended_index"]] == data["recommended"]


def test_deepseek_v3_on_256_devices():
    plan = plan_parallel(
        get_preset("deepseek-v3"), gpus=256, gpu_memory="80GiB", activation_checkpointing=True
    )
    assert [s.ep for s in plan.splits] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    # 671B parameters, 12 optimizer bytes each, over 256 devices.
    assert plan.splits[0].optimizer == pytest.approx(671e9 * 12 / 256, rel=0.01)
    assert not plan.splits[0].fits  # every expert of a layer gathered whole: too much
    assert plan.best.fits and plan.best.ep > 1


@pytest.mark.parametrize(
    "name", ["gpt-oss-20b", "demo-hierarchical", "deepseek-v3", "qwen3-30b-a3b"]
)
def test_every_preset_plans(name):
    # router and expert biases (gpt-oss), the group router (hierarchical) are in the units
    cfg = get_preset(name)
    plan = plan_parallel(cfg, gpus=8)
    assert plan.params == count_params(cfg).total
