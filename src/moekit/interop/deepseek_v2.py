"""DeepSeek-V2 and V2-Lite (DeepseekV2ForCausalLM): multi-head latent attention as in
DeepSeek-V3 (V2-Lite's queries are full rank: `q_lora_rank` null), softmax routing with
shared experts, dense first layers and a routed scaling factor, and no selection bias.

Routing (`topk_method`): "greedy" picks each token's top-k experts by softmax probability
(expert groups, if the checkpoint states any, are not used); "group_limited_greedy" first
keeps the token's best `topk_group` of `n_group` groups, each scored by its best expert
(moekit's `group_score="max"`). The chosen probabilities are not renormalised and are
multiplied by `routed_scaling_factor`.

V2 rotates the RoPE part of its queries and keys as complex numbers, pairs (x0, x1),
(x2, x3), ...: the interleaved layout of DeepSeek-V3, so the rows that produce them are
reordered the same way on import and export (`RopeRows`), always (V2 has no
`rope_interleave` flag). The attention, the YaRN scaling and its softmax correction are
those of `moekit.interop.deepseek_v3`, whose table fragments this module shares.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig
from moekit.interop.architecture import Architecture
from moekit.interop.deepseek_v3 import PER_EXPERT, STACKED, mla_config, mla_weights
from moekit.interop.fields import (
    Check,
    Entry,
    Field,
    Fixed,
    HFConfig,
    Only,
    unsupported,
)

METHODS = ("greedy", "group_limited_greedy")


class GroupRouting(Entry):
    """`topk_method` with `n_group` and `topk_group` as moekit's expert groups: "greedy" is
    one group; "group_limited_greedy" groups scored by their best expert."""

    def hf_names(self) -> tuple[str, ...]:
        return ("topk_method", "n_group", "topk_group")

    def ours_paths(self) -> tuple[str, ...]:
        return ("moe.num_groups", "moe.topk_groups", "moe.group_score")

    def limits(self) -> list[str]:
        return ["topk_method: 'greedy' or 'group_limited_greedy' (groups scored by their best)"]

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        method = hf.get("topk_method") or "greedy"
        if method not in METHODS:
            raise unsupported(
                "topk_method", method, "DeepSeek-V2 routes by 'greedy' or 'group_limited_greedy'"
            )
        groups, chosen = 1, 1
        if method == "group_limited_greedy":
            for name in ("n_group", "topk_group"):
                if not hf.get(name):
                    raise unsupported(name, hf.get(name), "group_limited_greedy needs it")
            groups, chosen = int(hf["n_group"]), int(hf["topk_group"])
        ours["moe.num_groups"], ours["moe.topk_groups"] = groups, chosen
        ours["moe.group_score"] = "max"

    def write(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        assert cfg.moe is not None
        grouped = cfg.moe.num_groups > 1
        hf["topk_method"] = METHODS[grouped]
        hf["n_group"], hf["topk_group"] = cfg.moe.num_groups, cfg.moe.topk_groups

    def problems(self, cfg: ModelConfig) -> list[str]:
        if cfg.moe is not None and cfg.moe.num_groups > 1 and cfg.moe.group_score != "max":
            return ["DeepSeek-V2 scores expert groups by their best expert (group_score='max')"]
        return []


CONFIG = (
    *mla_config("DeepSeek-V2"),
    GroupRouting(),
    Only("mlp_bias", (None, False), "moekit's MLPs have no biases", write_value=False),
    Only(
        "norm_topk_prob",
        (None, False),
        "transformers' DeepSeek-V2 never renormalises the chosen experts' weights while "
        "DeepSeek's own code does when it is set; the checkpoint's meaning is ambiguous",
        write_value=False,
    ),
    Fixed(
        {"moe.norm_topk_prob": False},
        "DeepSeek-V2 does not renormalise the chosen experts' weights",
    ),
    Only(
        "n_shared_experts",
        lambda v, hf: v is None or v >= 1,
        "transformers' DeepSeek-V2 always has shared experts",
    ),
    Field("n_shared_experts", "moe.num_shared_experts", default=2, cast=int),
    Check(
        "DeepSeek-V2 always has shared experts (num_shared_experts >= 1)",
        lambda cfg: cfg.moe is None or cfg.moe.num_shared_experts >= 1,
        ("moe.num_shared_experts",),
    ),
    Field("aux_loss_alpha", "moe.aux_loss_weight", default=0.001, cast=float),
    Fixed(
        {"moe.router": "topk", "moe.score_func": "softmax"}, "DeepSeek-V2 routes by softmax top-k"
    ),
    Fixed(
        {"moe.selection_bias": False, "moe.bias_update_rate": 0.0},
        "DeepSeek-V2's routers have no selection bias",
    ),
)

ARCH = Architecture(
    name="DeepseekV2ForCausalLM",
    model_type="deepseek_v2",
    label="DeepSeek-V2",
    config=CONFIG,
    weights=mla_weights(PER_EXPERT, flagged=False),
    live_weights=mla_weights(STACKED, flagged=False),
)
