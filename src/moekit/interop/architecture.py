"""`Architecture`: one Hugging Face architecture as data, its config table, weight tables and
tokenizer format; the module of each architecture builds one, and `moekit.interop.hf` lists
them and drives conversions with them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moekit.config import ModelConfig
from moekit.interop.fields import (
    ConfigTable,
    UnsupportedError,
    check_table,
    config_problems,
    read_config,
    write_config,
)
from moekit.interop.tensors import TensorMap, WeightTable, bind
from moekit.interop.tokenizer import TokenizerFormat


def _nothing_ignored(key: str, cfg: ModelConfig) -> bool:
    return False


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture maps to moekit.

    `config` is its config table (moekit.interop.fields), `weights` where each moekit tensor
    lives in its checkpoints (moekit.interop.tensors) and `live_weights` where it lives in
    transformers' model in memory (whose experts are stacked and fused), `tokenizer` the
    tokenizer files its checkpoints carry. `ignore(key, cfg)` says a checkpoint tensor is
    deliberately not imported (DeepSeek-V3's multi-token-prediction layer).
    """

    name: str  # the `architectures` entry of config.json, e.g. "MixtralForCausalLM"
    model_type: str  # config.json's `model_type`, e.g. "mixtral"
    label: str  # how messages name it, e.g. "Mixtral"
    config: ConfigTable
    weights: WeightTable
    live_weights: WeightTable
    tokenizer: TokenizerFormat = field(default_factory=TokenizerFormat)
    ignore: Callable[[str, ModelConfig], bool] = _nothing_ignored

    def __post_init__(self) -> None:
        check_table(self.config, self.name)

    def config_from_hf(self, hf: Mapping[str, Any]) -> ModelConfig:
        """The ModelConfig of a checkpoint configured by `hf`; UnsupportedError naming the first
        setting moekit cannot represent exactly."""
        return read_config(self.config, hf)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """The config.json fields (but `architectures` and `model_type`) of `cfg`, which must
        have no `problems`."""
        return write_config(self.config, cfg)

    def problems(self, cfg: ModelConfig) -> list[str]:
        """What keeps this architecture from representing `cfg` exactly (empty: nothing)."""
        return config_problems(self.config, cfg)

    def check(self, cfg: ModelConfig) -> None:
        """Raise UnsupportedError listing the `problems` of `cfg`, if any."""
        found = self.problems(cfg)
        if found:
            raise UnsupportedError(
                f"this config has no {self.label} equivalent: " + "; ".join(found)
            )

    def tensor_maps(
        self, cfg: ModelConfig, hf: Mapping[str, Any], *, live: bool = False
    ) -> list[TensorMap]:
        """The maps of every tensor of the model `cfg`, to the checkpoint configured by `hf` (the
        checkpoint's config on import, the one being written on export: a layout flag there,
        such as DeepSeek-V3's `rope_interleave`, can change how a tensor maps), or with `live`
        to transformers' model in memory."""
        table = self.live_weights if live else self.weights
        return bind(table, cfg, hf, f"{self.name} ({'in memory' if live else 'checkpoint'})")


def hierarchical_refusal(target: str, computes: str, beside: str) -> UnsupportedError:
    """The error for exporting a hierarchically routed model to `target` ("Hugging Face
    architecture", "GGUF architecture llama.cpp runs"), whose models `computes` ("no
    transformers model has") a learned group router; `beside` names its nearest relative."""
    return UnsupportedError(
        f"no {target} represents this model: config.json: moe.router='hierarchical' has a "
        f"learned group router whose probability multiplies each expert's, which {computes} "
        f"({beside} only limits the choice by the experts' own scores); the model stays in "
        "moekit's format"
    )
