"""What `moekit info` reports: the accounting of a preset, a config file or a model directory,
several of them side by side, and the table of presets. Computed from configs alone (no
weights are read, torch is not imported)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig
from moekit.model_dir import FinetuneSummary, ModelDir
from moekit.params import ModelSummary, count_params, summary
from moekit.presets import PRESETS, get_preset
from moekit.speed import SpeedPrediction, measure_bandwidth, predict_decode

# What a fine-tuned model directory's finetune.json contributes to its info.
FINETUNE_FIELDS = (
    "method", "base", "trainable_params", "total_params", "trainable_fraction", "esft_experts"
)  # fmt: skip


@dataclass(frozen=True)
class ModelInfo:
    """One model's figures. `name` is the preset or path asked for; `finetune` what a
    fine-tuned model directory was trained with (method, base, trainable parameters and, for
    expert-specialised tuning, the experts trained per layer), else None."""

    name: str
    summary: ModelSummary
    finetune: FinetuneSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, **self.summary.to_dict()}
        if self.finetune is not None:
            tuned = self.finetune.to_dict()
            out["finetune"] = {k: tuned[k] for k in FINETUNE_FIELDS if k in tuned}
        return out


@dataclass(frozen=True)
class PresetInfo:
    name: str
    description: str
    total_params: int
    active_params: int


def resolve_config(target: str) -> ModelConfig:
    """A preset name, a model directory or a config.json path -> its ModelConfig. A model
    directory of that name wins over a preset."""
    path = Path(target)
    if path.is_file() or ModelDir(path).is_model():
        return ModelConfig.load(path)
    if target in PRESETS:
        return get_preset(target)
    if path.exists():
        return ModelConfig.load(path)
    raise ValueError(
        f"{target!r} is neither a preset nor an existing model directory or config file; "
        f"presets: {', '.join(PRESETS)}"
    )


def model_info(target: str, *, context: int = 2048) -> ModelInfo:
    """The figures of one preset, config file or model directory, FLOPs at `context`."""
    tuned = ModelDir(target).finetune_summary() if Path(target).is_dir() else None
    return ModelInfo(target, summary(resolve_config(target), context=context), tuned)


# The figures `ratios` compares, and how to read each from a summary.
COMPARED: dict[str, Callable[[ModelSummary], float]] = {
    "total_params": lambda s: s.total_params,
    "active_params": lambda s: s.active_params,
    "flops_per_token": lambda s: s.flops_per_token,
    "weight_bytes_bf16": lambda s: s.weight_memory_bytes["bf16"],
    "kv_cache_bytes_per_1k_tokens_bf16": lambda s: s.kv_cache_bytes_per_1k_tokens["bf16"],
}


def ratios(infos: Sequence[ModelInfo]) -> dict[str, list[float]]:
    """Each compared figure of every model relative to the first model's (NaN where the first
    model's figure is zero)."""
    first = infos[0].summary
    return {
        name: [get(i.summary) / get(first) if get(first) else float("nan") for i in infos]
        for name, get in COMPARED.items()
    }


def preset_infos() -> list[PresetInfo]:
    """Every preset with its description and parameter counts."""
    rows = []
    for preset in PRESETS.values():
        pc = count_params(preset.build())
        rows.append(PresetInfo(preset.name, preset.description, pc.total, pc.active))
    return rows


def speed_info(
    target: str, *, batch: int = 1, context: int = 128, bytes_per_weight: float = 4.0
) -> SpeedPrediction:
    """Predicted decode tokens/s of `target` (a preset, config file or model directory) on
    this machine: the bytes a decode step reads (weights of `bytes_per_weight` bytes, a KV
    cache of `context` positions) over the memory bandwidth measured now (a few seconds). A
    bound that large models approach; small models are bound by per-call overhead instead.
    A memory budget for the experts plugs in through `moekit.speed.predict_decode`'s
    `expert_hit_rate` and `miss_bandwidth`."""
    return predict_decode(
        resolve_config(target),
        measure_bandwidth(),
        batch=batch,
        context=context,
        bytes_per_weight=bytes_per_weight,
    )
