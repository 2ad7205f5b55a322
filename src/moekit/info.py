"""What `moekit info` reports: the accounting of a preset, a config file or a model directory,
several of them side by side, and the table of presets. Computed from configs alone (no
weights are read, torch is not imported)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig, RopeScalingConfig
from moekit.irope import IRoPEConfig
from moekit.model_dir import FinetuneSummary, ModelDir, stored_tensors
from moekit.params import ModelSummary, count_params, summary
from moekit.presets import PRESETS, get_preset
from moekit.speed import (
    SpeedPrediction,
    expected_hit_rate,
    measure_bandwidth,
    measure_read_bandwidth,
    predict_decode,
)

# What a fine-tuned model directory's finetune.json contributes to its info.
FINETUNE_FIELDS = (
    "method", "base", "trainable_params", "total_params", "trainable_fraction", "esft_experts"
)  # fmt: skip


# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
               "I16": 2, "U16": 2}  # fmt: skip
PARTS = ("experts", "attention", "embeddings", "other")


@dataclass(frozen=True)
class StoredBytes:
    """The bytes a model directory's weights take as stored (from the safetensors headers):
    per dtype ("F32", "I8", "U8", ...) and per part: "experts" (the routed experts),
    "attention", "embeddings" (the embedding and the output head) and "other" (routers, norms,
    dense and shared-expert MLPs). `quantization` is config.json's block, or None."""

    by_dtype: dict[str, int]
    by_part: dict[str, int]
    quantization: dict[str, Any] | None = None

    @property
    def total(self) -> int:
        return sum(self.by_dtype.values())


def part_of(tensor: str) -> str:
    """The part (see `StoredBytes`) a stored tensor belongs to, by its name."""
    if ".ffn.experts." in tensor:
        return "experts"
    if ".attn." in tensor:
        return "attention"
    if tensor.startswith(("embed.", "lm_head.")):
        return "embeddings"
    return "other"


def stored_bytes(directory: str | Path, cfg: ModelConfig) -> StoredBytes:
    by_dtype: dict[str, int] = {}
    by_part = dict.fromkeys(PARTS, 0)
    for name, t in stored_tensors(Path(directory)).items():
        n = DTYPE_BYTES.get(t.dtype, 1)
        for dim in t.shape:
            n *= dim
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + n
        by_part[part_of(name)] += n
    q = cfg.quantization.to_dict() if cfg.quantization is not None else None
    return StoredBytes(by_dtype, by_part, q)


@dataclass(frozen=True)
class ModelInfo:
    """One model's figures. `name` is the preset or path asked for; `finetune` what a
    fine-tuned model directory was trained with (method, base, trainable parameters and, for
    expert-specialised tuning, the experts trained per layer), else None; `stored` the bytes of
    a model directory's weights as stored (None for a preset or config file)."""

    name: str
    summary: ModelSummary
    finetune: FinetuneSummary | None = None
    stored: StoredBytes | None = None
    rope_theta: float | None = None
    rope_scaling: RopeScalingConfig | None = None
    irope: IRoPEConfig | None = None

    @property
    def rope(self) -> str:
        """RoPE's scaling in words: "none" or e.g. "YaRN x40 from 4096 positions"."""
        return "none" if self.rope_scaling is None else self.rope_scaling.describe()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, **self.summary.to_dict()}
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_dict()
        out["irope"] = None if self.irope is None else self.irope.to_dict()
        if self.stored is not None:
            out["stored_bytes"] = {
                "total": self.stored.total,
                "by_dtype": self.stored.by_dtype,
                "by_part": self.stored.by_part,
                "quantization": self.stored.quantization,
            }
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
    is_dir = Path(target).is_dir()
    tuned = ModelDir(target).finetune_summary() if is_dir else None
    cfg = resolve_config(target)
    stored = None
    if is_dir and len(ModelDir(target).model_files()) > 1:  # config.json and weights
        stored = stored_bytes(target, cfg)
    return ModelInfo(
        target,
        summary(cfg, context=context),
        tuned,
        stored,
        cfg.rope_theta,
        cfg.rope_scaling,
        cfg.irope,
    )


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
    target: str,
    *,
    batch: int = 1,
    context: int = 128,
    bytes_per_weight: float = 4.0,
    cache_slots: int | None = None,
) -> SpeedPrediction:
    """Predicted decode tokens/s of `target` (a preset, config file or model directory) on
    this machine: the bytes a decode step reads (weights of `bytes_per_weight` bytes, a KV
    cache of `context` positions) over the memory bandwidth measured now (a few seconds). A
    bound that large models approach; small models are bound by per-call overhead instead.

    With `cache_slots` (experts per MoE layer that a memory budget keeps, see
    `moekit.infer.offload.plan_budget`), the expert hit rate is `expected_hit_rate`'s uniform
    routing figure, and each missed expert is read first at the file read bandwidth measured
    on the model's weight file (a temporary file for a preset), warm in the page cache."""
    cfg = resolve_config(target)
    hit_rate, miss_bandwidth = 1.0, None
    if cache_slots is not None:
        if cfg.moe is None:
            raise ValueError(f"{target} has no MoE layers: there are no experts to page")
        hit_rate = expected_hit_rate(cache_slots, cfg.moe.num_experts)
        if hit_rate < 1.0:
            projection = cfg.dim * cfg.moe.expert_hidden * bytes_per_weight  # one read
            miss_bandwidth = measure_read_bandwidth(
                expert_file(target), chunk_bytes=int(projection)
            )
    return predict_decode(
        cfg,
        measure_bandwidth(),
        batch=batch,
        context=context,
        bytes_per_weight=bytes_per_weight,
        expert_hit_rate=hit_rate,
        miss_bandwidth=miss_bandwidth,
    )


def expert_file(target: str) -> Path | None:
    """The weight file holding a model directory's routed experts (None for a preset or a
    config file, or a directory without weights)."""
    if not ModelDir(Path(target)).is_model():
        return None
    for name, t in stored_tensors(Path(target)).items():
        if part_of(name) == "experts" and t.path is not None:
            return Path(t.path)
    return None
