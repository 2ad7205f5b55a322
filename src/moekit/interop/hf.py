"""Hugging Face checkpoints in and out: the shared machinery.

A Hugging Face model directory holds config.json, safetensors weights (one file, or shards with
model.safetensors.index.json) and usually tokenizer.json with tokenizer_config.json. Each
supported architecture lives in its own small module of this package and provides an
`Architecture`: how its config maps to a `ModelConfig` and back, and a list of `TensorMap`s,
one per moekit tensor, naming the Hugging Face tensors it is made of. Anything the mapping
cannot represent exactly is a `ValueError` naming the field, never a silent mismatch.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.files import atomic_write_text
from moekit.model_dir import ModelDir, ShardWriter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- tensor maps -----------------------------------------------------------------------------


def _one(ts: list[Tensor]) -> Tensor:
    return ts[0]


def _as_list(t: Tensor) -> list[Tensor]:
    return [t]


def _stack(ts: list[Tensor]) -> Tensor:
    return torch.stack(ts)


def _unbind(t: Tensor) -> list[Tensor]:
    return [x.contiguous() for x in t.unbind(0)]


@dataclass(frozen=True)
class TensorMap:
    """moekit tensor `ours` is `join(theirs)`; going back, `split(ours)` gives `theirs`."""

    ours: str
    theirs: tuple[str, ...]
    join: Callable[[list[Tensor]], Tensor] = _one
    split: Callable[[Tensor], list[Tensor]] = _as_list


def copy(ours: str, theirs: str) -> TensorMap:
    return TensorMap(ours, (theirs,))


def stacked(ours: str, theirs: Sequence[str]) -> TensorMap:
    """One stacked [E, ...] moekit tensor from per-expert Hugging Face tensors."""
    return TensorMap(ours, tuple(theirs), _stack, _unbind)


def expert_maps(
    ours: str, theirs: str, num_experts: int, names: tuple[str, str, str]
) -> list[TensorMap]:
    """The stacked experts of one layer. `theirs` is the experts' prefix with `{e}` for the
    index; `names` are their (gate, up, down) projection names."""
    gate, up, down = names
    return [
        stacked(
            f"{ours}.w_gate", [f"{theirs.format(e=e)}.{gate}.weight" for e in range(num_experts)]
        ),
        stacked(f"{ours}.w_up", [f"{theirs.format(e=e)}.{up}.weight" for e in range(num_experts)]),
        stacked(
            f"{ours}.w_down", [f"{theirs.format(e=e)}.{down}.weight" for e in range(num_experts)]
        ),
    ]


def mlp_maps(ours: str, theirs: str) -> list[TensorMap]:
    """A dense SwiGLU MLP stored as gate_proj / up_proj / down_proj."""
    return [
        copy(f"{ours}.w_gate.weight", f"{theirs}.gate_proj.weight"),
        copy(f"{ours}.w_up.weight", f"{theirs}.up_proj.weight"),
        copy(f"{ours}.w_down.weight", f"{theirs}.down_proj.weight"),
    ]


def gqa_maps(i: int, cfg: ModelConfig) -> list[TensorMap]:
    """q/k/v/o projections (with biases and q/k norms when the config has them)."""
    ours, theirs = f"layers.{i}.attn", f"model.layers.{i}.self_attn"
    maps = [copy(f"{ours}.w{p}.weight", f"{theirs}.{p}_proj.weight") for p in "qkvo"]
    if cfg.attention.qkv_bias:
        maps += [copy(f"{ours}.w{p}.bias", f"{theirs}.{p}_proj.bias") for p in "qkv"]
    if cfg.attention.qk_norm != "none":
        maps += [copy(f"{ours}.{p}_norm.weight", f"{theirs}.{p}_norm.weight") for p in "qk"]
    return maps


def common_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Embeddings, final norm, LM head, and every layer's two norms."""
    maps = [
        copy("embed.weight", "model.embed_tokens.weight"),
        copy("norm.weight", "model.norm.weight"),
    ]
    if not cfg.tie_embeddings:
        maps.append(copy("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.num_layers):
        maps.append(
            copy(f"layers.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight")
        )
        maps.append(
            copy(f"layers.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")
        )
    return maps


# ---- config helpers --------------------------------------------------------------------------


class UnsupportedError(ValueError):
    """The checkpoint uses something moekit cannot represent exactly."""


def field_of(hf: dict[str, Any], name: str, default: Any = ...) -> Any:
    """`hf[name]`, or `default`; a missing required field is a clear error. Names the
    transformers versions spell differently (num_experts / num_local_experts) are found
    under either spelling."""
    for key in (name, *ALIASES.get(name, ())):
        if key in hf and hf[key] is not None:
            return hf[key]
    if default is ...:
        raise UnsupportedError(f"config.json has no {name!r}")
    return default


ALIASES = {"num_experts": ("num_local_experts",), "num_local_experts": ("num_experts",)}


def require(
    hf: dict[str, Any], name: str, allowed: Callable[[Any], bool], what: str, default: Any = None
) -> None:
    value = hf.get(name, default)
    if not allowed(value):
        raise UnsupportedError(f"config.json: {name}={value!r} is not supported ({what})")


def rope_theta(hf: dict[str, Any]) -> float:
    """The RoPE base of a config written by transformers 4 (`rope_theta`, `rope_scaling`) or 5
    (`rope_parameters`); scaled RoPE variants are not supported."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        where = "rope_parameters.rope_type" if params.get("rope_type") else "rope_scaling.type"
        raise UnsupportedError(
            f"config.json: {where}={kind!r} is not supported: moekit implements unscaled RoPE "
            "only (YaRN, linear and dynamic scaling are not available)"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def base_model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields every supported architecture states the same way."""
    require(hf, "hidden_act", lambda v: v in (None, "silu"), "experts and MLPs are SwiGLU")
    dim, heads = field_of(hf, "hidden_size"), field_of(hf, "num_attention_heads")
    return {
        "vocab_size": field_of(hf, "vocab_size"),
        "dim": dim,
        "num_layers": field_of(hf, "num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": field_of(hf, "num_key_value_heads", heads),
        "rope_theta": rope_theta(hf),
        "norm_eps": float(field_of(hf, "rms_norm_eps", 1e-6)),
        "max_seq_len": field_of(hf, "max_position_embeddings"),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def require_no_attention_bias(hf: dict[str, Any]) -> None:
    """Refuse `attention_bias: true` (Qwen3-MoE, OLMoE): in transformers it gives all four of
    q/k/v/o_proj a bias, and moekit's attention has no output-projection bias (its
    `qkv_bias` covers q/k/v only, as Qwen2-MoE's `qkv_bias` does)."""
    if hf.get("attention_bias"):
        raise UnsupportedError(
            f"config.json: attention_bias={hf['attention_bias']!r} is not supported: it gives "
            "o_proj a bias too, and moekit's attention has biases on q/k/v only"
        )


def check_sliding_window(hf: dict[str, Any], *, enabled: bool) -> None:
    """Refuse a sliding attention window narrower than the context. moekit attends to the whole
    context (at most `max_position_embeddings` tokens, which generation enforces), so a window
    at least that wide never hides a key and is the same function as full attention; a
    narrower one is not. `enabled` says whether the architecture applies `sliding_window`
    (Qwen only does with `use_sliding_window`)."""
    window = hf.get("sliding_window")
    if not enabled or window is None:
        return
    context = field_of(hf, "max_position_embeddings")
    if window < context:
        raise UnsupportedError(
            f"config.json: sliding_window={window} is not supported: it is narrower than "
            f"max_position_embeddings={context} and moekit attends to the full context (a "
            "window at least as wide as the context changes nothing and is accepted)"
        )


def head_dim_field(hf: dict[str, Any]) -> int | None:
    """An explicit head_dim only when it differs from hidden_size / heads."""
    head_dim = hf.get("head_dim")
    if head_dim is None or head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
        return None
    return int(head_dim)


def base_hf_fields(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


# ---- architectures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture maps to moekit.

    `tensor_maps(cfg, hf)` maps the tensors of a moekit config to those of the Hugging Face
    config `hf` on the other side (the checkpoint's config on import, the one being written on
    export): a layout flag there, such as DeepSeek-V3's `rope_interleave`, can change how a
    tensor maps. `problems(cfg)` lists what keeps this architecture from representing a moekit
    config exactly (empty: it can). `ignored(key, cfg)` says a checkpoint tensor is
    deliberately not imported (e.g. DeepSeek-V3's multi-token-prediction layer).
    """

    name: str  # the `architectures` entry, e.g. "MixtralForCausalLM"
    model_type: str
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    tensor_maps: Callable[[ModelConfig, dict[str, Any]], list[TensorMap]]
    problems: Callable[[ModelConfig], list[str]]
    ignored: Callable[[str, ModelConfig], bool] = field(default=lambda key, cfg: False)


def architectures() -> dict[str, Architecture]:
    """Every supported architecture, by its Hugging Face class name."""
    from moekit.interop import deepseek_v3, mixtral, olmoe, qwen_moe

    archs = [mixtral.ARCH, qwen_moe.QWEN2_MOE, qwen_moe.QWEN3_MOE, olmoe.ARCH, deepseek_v3.ARCH]
    return {a.name: a for a in archs}


def architecture_of(hf: dict[str, Any]) -> Architecture:
    archs = architectures()
    names = hf.get("architectures") or []
    for name in names:
        if name in archs:
            return archs[name]
    by_type = {a.model_type: a for a in archs.values()}
    if hf.get("model_type") in by_type:
        return by_type[hf["model_type"]]
    raise UnsupportedError(
        f"config.json: architectures={names!r} (model_type={hf.get('model_type')!r}) is not "
        f"supported; moekit converts {', '.join(archs)}"
    )


def choose_architecture(cfg: ModelConfig) -> Architecture:
    """The standard architecture that represents `cfg` exactly (the plainest that can)."""
    order = [
        "MixtralForCausalLM",
        "Qwen3MoeForCausalLM",
        "OlmoeForCausalLM",
        "Qwen2MoeForCausalLM",
        "DeepseekV3ForCausalLM",
    ]
    archs = architectures()
    reasons = {}
    for name in order:
        problems = archs[name].problems(cfg)
        if not problems:
            return archs[name]
        reasons[name] = "; ".join(problems)
    detail = "\n".join(f"  {name}: {why}" for name, why in reasons.items())
    raise UnsupportedError(f"no Hugging Face architecture represents this model exactly:\n{detail}")


# ---- reading a checkpoint --------------------------------------------------------------------


class HFCheckpoint:
    """A Hugging Face model directory, its tensors read lazily (memory-mapped) one by one."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        config = self.directory / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{self.directory} has no config.json")
        try:
            self.config: dict[str, Any] = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config} is not valid JSON: {e}") from e
        self._file_of = self._index()
        self._open: dict[Path, Any] = {}

    def _index(self) -> dict[str, Path]:
        index = self.directory / ModelDir.INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: self.directory / v for k, v in weight_map.items()}
        single = self.directory / ModelDir.WEIGHTS
        if not single.is_file():
            raise FileNotFoundError(
                f"{self.directory} holds no {ModelDir.WEIGHTS} or {ModelDir.INDEX} (only "
                "safetensors checkpoints are read; convert .bin files with transformers first)"
            )
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)

    def keys(self) -> list[str]:
        return list(self._file_of)

    def has(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> Tensor:
        from safetensors import safe_open

        path = self._file_of.get(key)
        if path is None:
            raise UnsupportedError(f"the checkpoint has no tensor {key!r}")
        if path not in self._open:
            try:
                self._open[path] = safe_open(str(path), framework="pt")
            except Exception as e:
                raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
        return self._open[path].get_tensor(key)


# ---- import / export -------------------------------------------------------------------------


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> ModelConfig:
    """Convert a Hugging Face checkpoint into a moekit model directory; returns its config.

    Tensors are read one at a time from memory-mapped files and written shard by shard, so
    the conversion never holds two copies of the model. `dtype` ("float32", "bfloat16",
    "float16") converts the weights; by default they keep their stored dtype (routers and
    selection biases always float32). The tokenizer files are carried over.
    """
    from moekit.version import __version__

    ckpt = HFCheckpoint(hf_dir)
    arch = architecture_of(ckpt.config)
    cfg = arch.config_from_hf(ckpt.config)
    target = _dtype(dtype)
    maps = arch.tensor_maps(cfg, ckpt.config) + _buffer_maps(cfg)
    used = {k for m in maps for k in m.theirs}
    leftovers = [k for k in ckpt.keys() if k not in used and not arch.ignored(k, cfg)]  # noqa: SIM118
    if leftovers:
        raise UnsupportedError(
            f"{len(leftovers)} tensor(s) of the checkpoint have no place in the moekit model "
            f"(e.g. {', '.join(sorted(leftovers)[:4])}); refusing to drop them silently"
        )
    out = Path(out_dir)
    writer = ShardWriter(
        out, metadata={"moekit_version": __version__}, **_shard_kw(max_shard_bytes)
    )
    for m in maps:
        if m.ours.endswith("selection_bias") and not all(ckpt.has(k) for k in m.theirs):
            tensor = torch.zeros(cfg.moe.num_experts) if cfg.moe else torch.zeros(0)
        else:
            tensor = m.join([ckpt.get(k) for k in m.theirs])
        writer.add(m.ours, _cast(tensor, target, m.ours))
    writer.close()
    cfg.save(out / "config.json")
    _copy_tokenizer(ckpt.directory, out, ckpt.config)
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
    architecture chosen (the plainest one that represents the model exactly)."""
    from safetensors import safe_open

    from moekit.model_dir import weight_files

    src = Path(model_dir)
    cfg = ModelConfig.load(src)
    arch = choose_architecture(cfg)
    target = _dtype(dtype)
    files = weight_files(src)
    handles = [safe_open(str(p), framework="pt") for p in files]
    where = {k: h for h in handles for k in h.keys()}  # noqa: SIM118 (not a mapping)

    def ours(key: str) -> Tensor:
        if key not in where:
            raise ValueError(f"{src}: the weights have no tensor {key!r}")
        return where[key].get_tensor(key)

    hf: dict[str, Any] = {
        "architectures": [arch.name],
        "model_type": arch.model_type,
        **arch.config_to_hf(cfg),
    }
    out = Path(out_dir)
    writer = ShardWriter(out, metadata={"format": "pt"}, **_shard_kw(max_shard_bytes))
    stored: Counter[torch.dtype] = Counter()  # elements per dtype, float32 routing left out
    for m in arch.tensor_maps(cfg, hf) + _buffer_maps(cfg):
        for name, tensor in zip(m.theirs, m.split(ours(m.ours)), strict=True):
            tensor = _cast(tensor, target, m.ours)
            if not _keeps_float32(m.ours):
                stored[tensor.dtype] += tensor.numel()
            writer.add(name, tensor)
    writer.close()
    # The dtype the weights are stored in: transformers 5 reads `dtype`, earlier versions
    # `torch_dtype`; both are written so either loads the checkpoint in its own dtype.
    hf["dtype"] = hf["torch_dtype"] = _dtype_name(
        stored.most_common(1)[0][0] if stored else target or torch.float32
    )
    special = _special_ids(src)
    hf.update(special)
    atomic_write_text(out / "config.json", json.dumps(hf, indent=2) + "\n")
    generation = {k: v for k, v in special.items() if v is not None}
    atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return arch.name


def _buffer_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Router selection biases (DeepSeek-V3's e_score_correction_bias)."""
    moe = cfg.moe
    if moe is None or not (moe.selection_bias or moe.bias_update_rate > 0):
        return []
    return [
        copy(
            f"layers.{i}.ffn.router.selection_bias",
            f"model.layers.{i}.mlp.gate.e_score_correction_bias",
        )
        for i in cfg.moe_layers
    ]


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


def _copy_tokenizer(src: Path, out: Path, hf: dict[str, Any]) -> None:
    """Carry the tokenizer over, naming its end-of-text and padding tokens for moekit."""
    if not (src / "tokenizer.json").is_file():
        return
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    config: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        config = json.loads((src / "tokenizer_config.json").read_text())
    if not config.get("eos_token"):
        vocab = json.loads((src / "tokenizer.json").read_text()).get("added_tokens", [])
        by_id = {t["id"]: t["content"] for t in vocab}
        eos = hf.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        if eos in by_id:
            config["eos_token"] = by_id[eos]
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


def _special_ids(model_dir: Path) -> dict[str, int | None]:
    """bos/eos/pad token ids of a moekit model directory's tokenizer (None without one; a
    tokenizer trained by moekit has no BOS, and saying so keeps transformers from assuming
    its architecture's default)."""
    if not (model_dir / "tokenizer.json").is_file():
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    from moekit.data.tokenizer import Tokenizer

    tok = Tokenizer.load(model_dir)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def iter_tensor_names(maps: Sequence[TensorMap]) -> Iterator[str]:
    for m in maps:
        yield from m.theirs
