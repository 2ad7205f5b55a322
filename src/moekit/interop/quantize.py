"""Quantising a model directory into a new one (`moekit quantize`), tensor by tensor.

The source's tensors are read one at a time from memory-mapped files, quantised where the
quantisation says (see moekit.quant.build.targets) and written shard by shard, so the float
model never has to fit in memory. The output is a normal model directory whose config.json
records the quantisation; docs/model-directory.md describes the stored tensors.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from moekit.config import ModelConfig
from moekit.interop.checkpoint import LazyTensors
from moekit.model import meta_model
from moekit.model_dir import ModelDir, ShardWriter, check_fit, stored_tensors
from moekit.quant.build import Targets, already_quantized, check_shapes, targets
from moekit.quant.build import quantize_tensors as quantize_stream
from moekit.quant.formats import QWEIGHT, dequantize, stored_parts
from moekit.quant_config import QUANT_BITS, QUANT_GROUP_SIZES, QUANT_PARTS, QuantizationConfig
from moekit.version import __version__

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)
# A shard is assembled in memory before it is written: quantising keeps them small, so the
# memory a quantisation needs stays near one transformer block's float weights.
QUANTIZED_SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize` wrote: the directory, the quantisation, the bytes of the weights
    before and after, and how many stored float tensors were quantised."""

    out: str
    bits: int
    group_size: int | None
    parts: str
    bytes_before: int
    bytes_after: int
    tensors_quantized: int

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 4)}


def quantization_config(bits: int, group_size: int | None, only: str) -> QuantizationConfig:
    """The `QuantizationConfig` for these settings; a ValueError names the bad one."""
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits!r} is not a supported bit width: use 8 or 4")
    if only not in QUANT_PARTS:
        raise ValueError(f"only={only!r} is invalid: choose one of {', '.join(QUANT_PARTS)}")
    if group_size is not None:
        if bits == 8:
            raise ValueError("group_size applies to 4 bits only (8 bits scale each output row)")
        if group_size not in QUANT_GROUP_SIZES:
            allowed = ", ".join(map(str, QUANT_GROUP_SIZES))
            raise ValueError(f"group_size={group_size!r} is invalid: choose one of {allowed}")
    return QuantizationConfig(bits=bits, group_size=group_size, parts=only)


def quantize(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    bits: int,
    group_size: int | None = None,
    only: str = "experts",
    progress: Progress | None = None,
) -> QuantizeResult:
    """Write a weight-only quantised copy of the model directory `model_dir` into `out_dir`.

    `bits` 8: int8 with a scale per output channel; 4: int4 in groups of `group_size` input
    columns (default 32; 32, 64, 128 or 256) with a scale and minimum per group. `only`:
    "experts" quantises the routed experts, "all" every linear layer but the routers.
    Tokenizer and chat-template files are copied. Refused with a ValueError naming the
    problem: an already quantised input, an unknown bit width, a group size that does not
    divide a weight's input dimension, an output directory that already holds a model.
    `progress(done, total, tensor)` is called after each stored tensor."""
    q = quantization_config(bits, group_size, only)
    src = ModelDir(model_dir).require_model()
    cfg = src.config()
    if cfg.quantization is not None:
        raise ValueError(f"{src}: {already_quantized(cfg.quantization)}")
    out = ModelDir(out_dir)
    out.refuse_overwrite("quantize")
    meta = meta_model(cfg)
    found = targets(meta, q.parts)
    try:
        check_shapes(meta, found, q)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    stored = stored_tensors(src.path)
    expected = {k: tuple(t.shape) for k, t in meta.state_dict().items()}
    check_fit(expected, {k: t.shape for k, t in stored.items()}, f"{src}")
    weights = LazyTensors.of_files(src.weight_files(), f"{src}: the weights")
    names = weights.keys()
    result = _write(out, cfg, q, found, ((n, weights.get(n)) for n in names), len(names), progress)
    for path in src.tokenizer_files():
        shutil.copy2(path, out / path.name)
    out.save_config(_quantized_config(cfg, q))  # last: a directory with a config is complete
    return result


def quantize_random(
    cfg: ModelConfig | str,
    out_dir: str | Path,
    *,
    bits: int,
    group_size: int | None = None,
    only: str = "experts",
    seed: int = 0,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Write a quantised model directory of randomly initialised weights for `cfg` (a
    `ModelConfig` or a preset name) into `out_dir`, one block at a time: the float model never
    exists whole, so a preset far larger than memory in float32 (`qwen3-30b-a3b`) can be made
    on a small machine to measure speed and memory. The directory has no tokenizer (commands
    that need one say so). Settings and refusals as `quantize`."""
    from moekit.model import random_tensors
    from moekit.presets import get_preset

    q = quantization_config(bits, group_size, only)
    config = get_preset(cfg) if isinstance(cfg, str) else cfg
    out = ModelDir(out_dir)
    out.refuse_overwrite("quantize")
    meta = meta_model(config)
    found = targets(meta, q.parts)
    check_shapes(meta, found, q)
    total = len(meta.state_dict())
    result = _write(out, config, q, found, random_tensors(config, seed), total, progress)
    out.save_config(_quantized_config(config, q))
    return result


def _write(
    out: ModelDir,
    cfg: ModelConfig,
    q: QuantizationConfig,
    found: Targets,
    tensors: Iterator[tuple[str, Tensor]],
    total: int,
    progress: Progress | None,
) -> QuantizeResult:
    """Quantise `tensors` (float, named as in the model) into `out`'s weight files."""
    before = after = count = 0
    with ShardWriter(
        out.path, max_shard_bytes=QUANTIZED_SHARD_BYTES, metadata={"moekit_version": __version__}
    ) as writer:
        for done, (name, tensor) in enumerate(tensors, start=1):
            before += _nbytes(tensor)
            count += found.prefix(name) is not None
            for stored_name, value in quantize_stream(iter([(name, tensor)]), found, q):
                writer.add(stored_name, value)
                after += _nbytes(value)
            if progress is not None:
                progress(done, total, name)
    return QuantizeResult(str(out), q.bits, q.group_size, q.parts, before, after, count)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _quantized_config(cfg: ModelConfig, q: QuantizationConfig) -> ModelConfig:
    return ModelConfig.from_dict({**cfg.to_dict(), "quantization": q.to_dict()})


def quantized_targets(cfg: Any, q: QuantizationConfig) -> Targets:
    """What `q` quantises in the model `cfg` describes (for importers that stream tensors)."""
    meta = meta_model(cfg)
    found = targets(meta, q.parts)
    check_shapes(meta, found, q)
    return found


class DequantizedTensors(LazyTensors):
    """The float tensors of a quantised model directory, each quantised weight dequantised to
    float32 when it is read (what exporting a quantised model writes): float name `P.w_up`
    of stacked experts is stored as `P.w_up.qweight` ..., `L.weight` of a linear as
    `L.qweight` ...."""

    def __init__(self, tensors: LazyTensors, q: QuantizationConfig) -> None:
        super().__init__(tensors._file_of, tensors.label)
        self.q = q

    def _prefix(self, key: str) -> str | None:
        if super().has(key):
            return None
        for prefix in (key, key.removesuffix(".weight")):
            if super().has(f"{prefix}.{QWEIGHT}"):
                return prefix
        return None

    def has(self, key: str) -> bool:
        return super().has(key) or self._prefix(key) is not None

    def get(self, key: str) -> Tensor:
        prefix = self._prefix(key)
        if prefix is None:
            return super().get(key)
        names = stored_parts(self.q.bits)
        parts = {p: super(DequantizedTensors, self).get(f"{prefix}.{p}") for p in names}
        return dequantize(parts, self.q.bits, self.q.group_size)
