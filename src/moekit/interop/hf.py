"""Hugging Face checkpoints in and out: the registry of architectures and the conversions.

Each supported architecture is a small module of this package holding its tables (an
`Architecture`: config fields, weight names, tokenizer files); `ARCHITECTURES` lists them.
`import_hf` and `export_hf` convert any of them the same way: tensors read lazily one at a
time and written shard by shard, dtypes converted with routing state kept in float32, the
tokenizer carried over. Anything the tables cannot represent exactly is an `UnsupportedError`
naming the field or tensor, never a silent mismatch.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.files import read_json, write_json
from moekit.interop import (
    deepseek_v2,
    deepseek_v3,
    dots1,
    gpt_oss,
    llama4,
    mixtral,
    olmoe,
    qwen_moe,
)
from moekit.interop.architecture import Architecture, hierarchical_refusal
from moekit.interop.checkpoint import (
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HFCheckpoint,
    LazyTensors,
)
from moekit.interop.fields import UnsupportedError
from moekit.interop.quantize import (
    DequantizedTensors,
    quantization_config,
    quantized_targets,
)
from moekit.interop.tensors import TensorMap
from moekit.interop.tokenizer import export_tokenizer, import_tokenizer, special_ids
from moekit.model_dir import ModelDir, ShardWriter
from moekit.quant.build import quantize_tensors
from moekit.version import __version__

__all__ = [
    "ARCHITECTURES",
    "DTYPES",
    "Architecture",
    "HFCheckpoint",
    "UnsupportedError",
    "architecture_of",
    "architectures",
    "choose_architecture",
    "export_hf",
    "import_hf",
]

# Every supported architecture, in the order export tries them: the plainest that represents a
# model exactly is the one written.
ARCHITECTURES: tuple[Architecture, ...] = (
    mixtral.ARCH,
    qwen_moe.QWEN3_MOE,
    olmoe.ARCH,
    qwen_moe.QWEN2_MOE,
    deepseek_v2.ARCH,
    deepseek_v3.ARCH,
    dots1.ARCH,
    gpt_oss.ARCH,
    llama4.ARCH,
    llama4.MULTIMODAL,  # import only: its text model is written as Llama4ForCausalLM
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def architectures() -> dict[str, Architecture]:
    """Every supported architecture, by its Hugging Face class name."""
    return {a.name: a for a in ARCHITECTURES}


def architecture_of(hf: dict[str, Any]) -> Architecture:
    """The architecture of a checkpoint configured by `hf` (by its `architectures`, else its
    `model_type`); UnsupportedError naming it when moekit does not convert it."""
    archs = architectures()
    names = hf.get("architectures") or []
    for name in names:
        if name in archs:
            return archs[name]
    by_type = {a.model_type: a for a in ARCHITECTURES}
    if hf.get("model_type") in by_type:
        return by_type[hf["model_type"]]
    raise UnsupportedError(
        f"{HF_CONFIG}: architectures={names!r} (model_type={hf.get('model_type')!r}) is not "
        f"supported; moekit converts {', '.join(archs)}"
    )


def choose_architecture(cfg: ModelConfig) -> Architecture:
    """The plainest architecture that represents `cfg` exactly; UnsupportedError listing what
    each one lacks when none does."""
    if cfg.moe is not None and cfg.moe.router == "hierarchical":
        raise hierarchical_refusal(
            "Hugging Face architecture",
            "no transformers model has",
            "DeepSeek-V3's n_group/topk_group",
        )
    reasons = {}
    for arch in ARCHITECTURES:
        problems = arch.problems(cfg)
        if not problems:
            return arch
        reasons[arch.name] = "; ".join(problems)
    detail = "\n".join(f"  {name}: {why}" for name, why in reasons.items())
    raise UnsupportedError(f"no Hugging Face architecture represents this model exactly:\n{detail}")


# ---- import / export -------------------------------------------------------------------------


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    quantize: int | None = None,
    group_size: int | None = None,
) -> ModelConfig:
    """Convert a Hugging Face checkpoint into a moekit model directory; returns its config.

    Tensors are read one at a time from memory-mapped files and written shard by shard, so
    the conversion never holds two copies of the model. `dtype` ("float32", "bfloat16",
    "float16") converts the weights; by default they keep their stored dtype (routers and
    selection biases always float32). The tokenizer files are carried over. A directory that
    already holds a model or a training run is refused: a conversion never overwrites one.
    `quantize` (8 or 4, with `group_size` for 4) quantises the routed experts as they are
    written (see moekit.interop.quantize), so the float model never exists whole in memory.
    """
    out = ModelDir(out_dir)
    out.refuse_overwrite("a conversion")
    if out.has_run():
        raise ValueError(
            f"{out} holds a training run ({ModelDir.METRICS} or {ModelDir.TRAIN_STATE}/); choose "
            "another output directory"
        )
    ckpt = HFCheckpoint(hf_dir)
    arch = architecture_of(ckpt.config)
    cfg = arch.config_from_hf(ckpt.config)
    target = _dtype(dtype)
    q = None if quantize is None else quantization_config(quantize, group_size, "experts")
    found = None if q is None else quantized_targets(cfg, q)
    maps = arch.tensor_maps(cfg, ckpt.config)
    used = {k for m in maps for k in m.theirs}
    leftovers = [k for k in ckpt.keys() if k not in used and not arch.ignore(k, cfg)]  # noqa: SIM118
    if leftovers:
        raise UnsupportedError(
            f"{len(leftovers)} tensor(s) of the checkpoint have no place in the moekit model "
            f"(e.g. {', '.join(sorted(leftovers)[:4])}); refusing to drop them silently"
        )
    meta = {"moekit_version": __version__}
    with ShardWriter(out.path, metadata=meta, **_shard_kw(max_shard_bytes)) as writer:
        for m in maps:
            for name, tensor in zip(m.ours, _import_one(m, ckpt.tensors), strict=True):
                stored = [(name, _cast(tensor, target, name))]
                if q is not None and found is not None:
                    stored = list(quantize_tensors(iter(stored), found, q))
                for stored_name, value in stored:
                    writer.add(stored_name, value)
    import_tokenizer(arch.tokenizer, ckpt.directory, out, ckpt.config)
    _import_generation_config(ckpt.directory, out)
    if q is not None:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "quantization": q.to_dict()})
    out.save_config(cfg)  # last: a directory with a config is a complete model
    return cfg


def export_hf(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> str:
    """Write a moekit model directory as a standard Hugging Face checkpoint that
    `transformers.AutoModelForCausalLM.from_pretrained` loads without custom code; returns the
    architecture chosen (the plainest one that represents the model exactly). A quantised
    model is written dequantised, in float32 unless `dtype` says otherwise."""
    src = ModelDir(model_dir)
    cfg = src.config()
    arch = choose_architecture(cfg)
    target = _dtype(dtype)
    weights = LazyTensors.of_files(src.weight_files(), f"{src}: the weights")
    if cfg.quantization is not None:  # written dequantised (float32, or `dtype`)
        weights = DequantizedTensors(weights, cfg.quantization)
    hf: dict[str, Any] = {
        "architectures": [arch.name],
        "model_type": arch.model_type,
        **arch.config_to_hf(cfg),
    }
    out = Path(out_dir)
    stored: Counter[torch.dtype] = Counter()  # elements per dtype, float32 routing left out
    with ShardWriter(out, metadata={"format": "pt"}, **_shard_kw(max_shard_bytes)) as writer:
        for m in arch.tensor_maps(cfg, hf):
            tensors = m.to_theirs([weights.get(name) for name in m.ours])
            for name, tensor in zip(m.theirs, tensors, strict=True):
                tensor = _cast(tensor, target, m.ours[0])
                if not _keeps_float32(m.ours[0]):
                    stored[tensor.dtype] += tensor.numel()
                writer.add(name, tensor)
    # The dtype the weights are stored in: transformers 5 reads `dtype`, earlier versions
    # `torch_dtype`; both are written so either loads the checkpoint in its own dtype.
    hf["dtype"] = hf["torch_dtype"] = _dtype_name(
        stored.most_common(1)[0][0] if stored else target or torch.float32
    )
    special = special_ids(src)
    hf.update(special)
    write_json(out / HF_CONFIG, hf)
    write_json(out / HF_GENERATION_CONFIG, _generation_config(src, special))
    export_tokenizer(arch.tokenizer, src, out)
    return arch.name


def _import_generation_config(src: Path, out: ModelDir) -> None:
    """Keep the checkpoint's generation_config.json (its EOS ids and sampling defaults), after
    checking that moekit reads it."""
    from moekit.infer.defaults import GenerationDefaults

    path = src / HF_GENERATION_CONFIG
    if path.is_file():
        GenerationDefaults.load(src)  # a ValueError naming the file and field
        shutil.copyfile(path, out / ModelDir.GENERATION_CONFIG)


def _generation_config(src: ModelDir, special: dict[str, int | None]) -> dict[str, Any]:
    """generation_config.json of an export: the model's own (kept from an import), with the
    tokenizer's special ids where it states none."""
    path = src / ModelDir.GENERATION_CONFIG
    generation: dict[str, Any] = read_json(path) if path.is_file() else {}
    for key, value in special.items():
        if value is not None:
            generation.setdefault(key, value)
    return generation


def _import_one(m: TensorMap, tensors: LazyTensors) -> list[Tensor]:
    """The moekit tensors of map `m`, read from the checkpoint and checked against the shapes
    the config gives them."""
    if m.optional and not all(tensors.has(k) for k in m.theirs):
        return [torch.zeros(shape) for shape in m.shapes]
    result = m.to_ours([tensors.get(k) for k in m.theirs])
    for name, tensor, expected in zip(m.ours, result, m.shapes, strict=True):
        if tensor.shape != expected:
            raise UnsupportedError(
                f"the checkpoint's {', '.join(m.theirs[:2])} gives {name} the shape "
                f"{tuple(tensor.shape)}, but {HF_CONFIG} makes it {tuple(expected)}"
            )
    return result


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is invalid: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _keeps_float32(ours: str) -> bool:
    """Whether the moekit tensor `ours` is routing state (router weights, selection biases),
    stored in float32 whatever the model's dtype: bf16 routers flip top-k choices."""
    return ".router." in ours


def _cast(tensor: Tensor, dtype: torch.dtype | None, ours: str) -> Tensor:
    """`tensor` (the moekit tensor `ours`, or a Hugging Face piece of it) in `dtype`; routing
    state always in float32. Decided by the moekit name, which is the same in both
    directions (the Hugging Face names of a router differ by architecture)."""
    if _keeps_float32(ours):
        return tensor.float()
    return tensor if dtype is None else tensor.to(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    """The spelling config.json uses: "bfloat16" for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def _shard_kw(max_shard_bytes: int | None) -> dict[str, int]:
    return {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
