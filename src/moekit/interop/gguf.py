"""GGUF files in and out: `export_gguf` writes a moekit model directory as a GGUF file that
llama.cpp (and Ollama) run, `import_gguf` reads one back into a model directory.

Both use the `gguf` package, the format's own Python library (its writer and reader, its
tensor-name table and its quantisation code). The architectures, their metadata and tensor
names are in moekit.interop.gguf_arch, the tokenizer in moekit.interop.gguf_tokenizer.

Export streams: the tensor descriptions are written first, then each tensor is computed,
converted and written in turn, so at most one tensor is held beyond the memory-mapped source.
The file is written under a temporary name and renamed into place when complete, so a refused
or failed conversion leaves nothing at the output path.

Types (`--type`): "f32" writes every tensor in float32; "f16" writes matrices in float16;
"q8_0" and "q4_0" quantise matrices whose rows split into 32-value blocks (q4_0 keeps the
token embedding and the output head in q8_0, as llama.cpp's quantiser does for quality).
Routers, norms and vectors always stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.files import atomic_path
from moekit.interop.architecture import hierarchical_refusal
from moekit.interop.fields import UnsupportedError
from moekit.interop.gguf_arch import GGUF_ARCHITECTURES, GPT_OSS, GgufArch
from moekit.interop.gguf_deepseek import DEEPSEEK2_V2, DEEPSEEK2_V3, DOTS1
from moekit.interop.gguf_llama4 import LLAMA4
from moekit.interop.gguf_rope import (
    FREQ_FACTOR_ARCHS,
    LLAMA3_KEYS,
    ROPE_FREQS,
    llama3_settings_of,
    rope_freq_factors,
    rope_meta,
    rope_scaling_of,
    same_factors,
)
from moekit.interop.gguf_tokenizer import tokenizer_metadata, write_tokenizer
from moekit.interop.quantize import DequantizedTensors
from moekit.interop.tensors import TensorMap, bind
from moekit.model_dir import ModelDir, ShardWriter
from moekit.version import __version__

TYPES = ("f32", "f16", "q8_0", "q4_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # llama.cpp's llama_ftype
_BLOCK = 32  # values per q8_0 / q4_0 block


@dataclass(frozen=True)
class GgufResult:
    """What a GGUF conversion did: the llama.cpp architecture, the file or directory written,
    the tensor type chosen and the tensors written."""

    architecture: str
    path: Path
    type: str
    tensors: int


# ---- architectures -------------------------------------------------------------------------------


def gguf_architectures() -> tuple[GgufArch, ...]:
    """Every GGUF architecture moekit reads and writes, in the order export tries them."""
    return (*GGUF_ARCHITECTURES, DEEPSEEK2_V2, DEEPSEEK2_V3, DOTS1, GPT_OSS, LLAMA4)


def gguf_architecture(name: str, meta: dict[str, Any]) -> GgufArch:
    """The architecture of a file whose general.architecture is `name` (and metadata `meta`);
    UnsupportedError listing those moekit reads otherwise."""
    for arch in gguf_architectures():
        if arch.name == name and arch.accepts(meta):
            return arch
    known = ", ".join(dict.fromkeys(a.name for a in gguf_architectures()))
    raise UnsupportedError(
        f"GGUF architecture {name!r} is not supported: moekit reads and writes {known}"
    )


def choose_gguf_architecture(cfg: ModelConfig) -> GgufArch:
    """The first architecture llama.cpp computes `cfg` exactly with; UnsupportedError listing
    what each lacks when none does."""
    if cfg.moe is not None and cfg.moe.router == "hierarchical":
        raise hierarchical_refusal(
            "GGUF architecture llama.cpp runs",
            "llama.cpp does not compute",
            "deepseek2's expert groups",
        )
    reasons = {}
    for arch in gguf_architectures():
        found = arch.problems(cfg)
        if not found:
            return arch
        reasons[f"{arch.name} ({arch.hf.label})"] = "; ".join(found)
    detail = "\n".join(f"  {name}: {why}" for name, why in reasons.items())
    raise UnsupportedError(f"no GGUF architecture llama.cpp runs represents this model:\n{detail}")


# ---- export ------------------------------------------------------------------------------------


def export_gguf(model_dir: str | Path, out_file: str | Path, *, type: str = "f16") -> GgufResult:
    """Write the moekit model directory `model_dir` as the GGUF file `out_file` (an existing
    directory: the file NAME-TYPE.gguf in it) in `type` ("f32", "f16", "q8_0", "q4_0").
    UnsupportedError (before anything is written) naming what llama.cpp cannot compute
    exactly: the architecture, the setting, what is supported."""
    import gguf

    if type not in TYPES:
        raise ValueError(f"type={type!r} is invalid: choose one of {', '.join(TYPES)}")
    src = ModelDir(model_dir)
    cfg = src.config()
    arch = choose_gguf_architecture(cfg)
    hf = {"architectures": [arch.hf.name], **arch.hf.config_to_hf(cfg)}
    meta = _metadata(arch, cfg, hf, type) | tokenizer_metadata(src, cfg.vocab_size)
    weights = _source_weights(src, cfg)
    maps = bind(arch.weights, cfg, hf, f"GGUF {arch.name}")
    out = Path(out_file)
    if out.is_dir():  # a directory: the file is named after the model and the type
        out = out / f"{src.path.resolve().name}-{type}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        for key, value in meta.items():
            _add(writer, key, value)
        plan = [(name, shape, _qtype(name, shape, type)) for name, shape in _names(maps)]
        factors = rope_freq_factors(cfg)  # Llama 3 RoPE scaling, as llama.cpp reads it
        if factors is not None:
            plan.append((ROPE_FREQS, tuple(factors.shape), _qtype(ROPE_FREQS, (1,), "f32")))
        for name, shape, qtype in plan:
            _describe(writer, name, shape, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = {name: qtype for name, _, qtype in plan}
        for m in maps:
            values = m.to_theirs([weights.get(n) for n in m.ours])
            for name, value in zip(m.theirs, values, strict=True):
                writer.write_tensor_data(_encode(value, done[name]))
        if factors is not None:
            writer.write_tensor_data(_encode(factors, done[ROPE_FREQS]))
        writer.close()
    return GgufResult(arch.name, out, type, len(plan))


def _source_weights(src: ModelDir, cfg: ModelConfig) -> Any:
    from moekit.interop.checkpoint import LazyTensors

    weights = LazyTensors.of_files(src.weight_files(), f"{src}: the weights")
    if cfg.quantization is not None:  # written from the dequantised weights
        weights = DequantizedTensors(weights, cfg.quantization)
    return weights


def _metadata(arch: GgufArch, cfg: ModelConfig, hf: dict[str, Any], type: str) -> dict[str, Any]:
    """general.* and the architecture's hyperparameters, from the Hugging Face fields `hf`."""
    meta: dict[str, Any] = {
        "general.name": "moekit model",
        "general.file_type": _FILE_TYPE[type],
        "general.quantization_version": 2,
        "general.source.moekit_version": __version__,
    }
    for key, field in arch.all_keys().items():
        value = hf.get(field)
        if value is not None:
            meta[key] = value
    computed = arch.meta_of(cfg) | rope_meta(cfg, deepseek=arch.name == "deepseek2")
    for key, value in computed.items():
        meta[key.replace("{arch}", arch.name)] = value
    return meta


def _add(writer: Any, key: str, value: Any) -> None:
    """One metadata entry with the GGUF type its Python value implies (ints as uint32, floats
    as float32, as llama.cpp's converter writes them)."""
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], int):
        writer.add_array(key, value)
    elif isinstance(value, list):
        writer.add_key_value(
            key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING
        )
    else:
        raise TypeError(f"GGUF metadata {key}: cannot write {value!r}")


def _names(maps: list[TensorMap]) -> list[tuple[str, tuple[int, ...]]]:
    """Every GGUF tensor with its shape: a one-to-one map keeps the moekit shape, any other
    is worked out on the meta device (no memory, no arithmetic)."""
    out = []
    for m in maps:
        if len(m.theirs) == len(m.ours):
            shapes = [tuple(shape) for shape in m.shapes]
        else:
            made = m.to_theirs([torch.empty(shape, device="meta") for shape in m.shapes])
            shapes = [tuple(t.shape) for t in made]
        out += list(zip(m.theirs, shapes, strict=True))
    return out


def _qtype(name: str, shape: tuple[int, ...], type: str) -> Any:
    """The GGML type tensor `name` is written in."""
    import gguf

    q = gguf.GGMLQuantizationType
    # Vectors, norms, routers and biases (gpt-oss's experts' are [E, F]), as llama.cpp's
    # converter keeps them.
    keep_float32 = len(shape) < 2 or ".ffn_gate_inp" in name or not name.endswith(".weight")
    if type == "f32" or keep_float32:
        return q.F32
    if type == "f16":
        return q.F16
    if shape[-1] % _BLOCK:
        return q.F16  # rows that do not split into blocks
    head = name.startswith(("token_embd.", "output."))
    return q.Q8_0 if type == "q8_0" or head else q.Q4_0


def _describe(writer: Any, name: str, shape: tuple[int, ...], qtype: Any) -> None:
    import gguf

    q = gguf.GGMLQuantizationType
    if qtype in (q.F32, q.F16):
        dtype = np.dtype(np.float32 if qtype == q.F32 else np.float16)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        return
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)


def _encode(value: Tensor, qtype: Any) -> np.ndarray:
    import gguf

    q = gguf.GGMLQuantizationType
    array = value.detach().to(torch.float32).contiguous().numpy()
    if qtype == q.F32:
        return array
    if qtype == q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


# ---- import ------------------------------------------------------------------------------------


def import_gguf(
    gguf_file: str | Path, out_dir: str | Path, *, dtype: str | None = None
) -> GgufResult:
    """Convert the GGUF file `gguf_file` into a moekit model directory `out_dir` (float32, or
    `dtype`): quantised tensors are dequantised with the `gguf` package's own code. Refused
    by name: an architecture or tensor type moekit does not read, a tokenizer it cannot
    rebuild, tensors the model has no place for."""
    import gguf

    from moekit.interop.hf import DTYPES

    path = Path(gguf_file)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    target = torch.float32 if dtype is None else DTYPES.get(dtype)
    if target is None:
        raise ValueError(f"dtype={dtype!r} is invalid: choose one of {', '.join(DTYPES)}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, struct.error, IndexError...
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from err
    meta = {
        name: _plain(f.contents())
        for name, f in reader.fields.items()
        if not name.startswith("GGUF.")
    }
    arch = gguf_architecture(str(meta.get("general.architecture")), meta)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UnsupportedError(f"{path}: the file has no token embedding (token_embd.weight)")
    vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF lists dimensions innermost first
    if ROPE_FREQS in tensors and not LLAMA3_KEYS.keys() <= meta.keys():
        meta |= _bare_rope_freqs(arch, meta, _decode(tensors, ROPE_FREQS, path))
    cfg = arch.hf.config_from_hf(_hf_config(arch, meta, set(tensors), vocab))
    maps = bind(arch.weights, cfg, {}, f"GGUF {arch.name}")
    used = {name for m in maps for name in m.theirs}
    if ROPE_FREQS in tensors or rope_freq_factors(cfg) is not None:
        _check_rope_freqs(cfg, arch.name, tensors, path)
        used.add(ROPE_FREQS)
    extra = sorted(set(tensors) - used)
    if extra:
        raise UnsupportedError(
            f"{path}: {len(extra)} tensor(s) have no place in the moekit model "
            f"(e.g. {', '.join(extra[:4])}); refusing to drop them silently"
        )
    out = ModelDir(out_dir)
    out.refuse_overwrite("a conversion")
    with ShardWriter(out.path, metadata={"moekit_version": __version__}) as writer:
        for m in maps:
            theirs = [_decode(tensors, name, path) for name in m.theirs]
            for name, value, shape in zip(m.ours, m.to_ours(theirs), m.shapes, strict=True):
                if tuple(value.shape) != tuple(shape):
                    raise UnsupportedError(
                        f"{path}: tensor {m.theirs[0]} has shape {tuple(value.shape)}, but the "
                        f"metadata makes {name} {tuple(shape)}"
                    )
                keep = torch.float32 if ".router." in name else target
                writer.add(name, value.to(keep))
    if "tokenizer.ggml.tokens" in meta:
        write_tokenizer(meta, out.path)
    out.save_config(cfg)  # last: a directory with a config is a complete model
    return GgufResult(arch.name, out.path, str(target).removeprefix("torch."), len(used))


def _bare_rope_freqs(arch: GgufArch, meta: dict[str, Any], factors: Tensor) -> dict[str, Any]:
    """The Llama 3 settings behind a file's `rope_freqs` without moekit's keys (written by
    llama.cpp's converter), when published settings make exactly those factors; {} when none
    does (the tensor is then refused by name)."""
    name = arch.name
    heads = meta.get(f"{name}.attention.head_count")
    head_dim = meta.get(f"{name}.rope.dimension_count") or meta.get(f"{name}.attention.key_length")
    width = meta.get(f"{name}.embedding_length")
    if head_dim is None and heads and width:
        head_dim = int(width) // int(heads)
    theta = meta.get(f"{name}.rope.freq_base", 10000.0)
    if not head_dim:
        return {}
    theta = float(str(np.float32(theta)))  # as the config reads it
    return llama3_settings_of(factors, int(head_dim), theta) or {}


def _check_rope_freqs(cfg: ModelConfig, arch: str, tensors: dict[str, Any], path: Path) -> None:
    """A file's `rope_freqs` (per-dimension RoPE factors) must be what the file's Llama 3
    settings make (moekit's keys, or published settings recognised from the factors), in an
    architecture whose graph reads them: factors no known settings make name no scaling moekit
    can carry, and settings without factors are not what llama.cpp computes."""
    ours = rope_freq_factors(cfg)
    if ours is not None and (ROPE_FREQS not in tensors or arch not in FREQ_FACTOR_ARCHS):
        raise UnsupportedError(
            f"{path}: the metadata states Llama 3 RoPE scaling (moekit.rope.llama3.*), but "
            f"llama.cpp would run this {arch} file unscaled: it reads the scaling only from a "
            f"{ROPE_FREQS} tensor, in {' and '.join(FREQ_FACTOR_ARCHS)} files"
        )
    stored = _decode(tensors, ROPE_FREQS, path)
    if ours is None:
        raise UnsupportedError(
            f"{path}: {ROPE_FREQS} holds per-dimension RoPE factors without the Llama 3 "
            "settings moekit writes beside them (moekit.rope.llama3.*), and no published Llama 3 "
            "settings make them; moekit carries Llama 3 scaling by its settings"
        )
    if not same_factors(ours, stored):
        raise UnsupportedError(
            f"{path}: {ROPE_FREQS} differs from the factors its Llama 3 settings make "
            f"({cfg.rope_scaling.describe() if cfg.rope_scaling else ''})"
        )


def _hf_config(
    arch: GgufArch, meta: dict[str, Any], names: set[str], vocab_size: int
) -> dict[str, Any]:
    """The Hugging Face config the GGUF metadata describes (so the architecture's own config
    table reads it, refusing what it refuses). Floats are stored as float32 in GGUF: each is
    read as the shortest decimal that float32 value stands for (1e-06, not 9.99999997e-07)."""
    hf: dict[str, Any] = {"architectures": [arch.hf.name], "model_type": arch.hf.model_type}
    try:
        scaling = rope_scaling_of(meta, arch.name)
    except ValueError as e:
        raise UnsupportedError(str(e)) from None
    if scaling is not None:
        hf["rope_scaling"] = scaling
    for key, field in arch.all_keys().items():
        if key in meta:
            value = meta[key]
            hf[field] = float(str(np.float32(value))) if isinstance(value, float) else value
    if "vocab_size" not in hf:
        hf["vocab_size"] = vocab_size
    hf["tie_word_embeddings"] = "output.weight" not in names
    hf.update(arch.implied)
    hf.update(arch.from_tensors(names))
    hf.update(arch.hf_of(meta))
    for key in ("bos_token_id", "eos_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            hf[key] = value
    return hf


def _plain(value: Any) -> Any:
    """A metadata value with numpy scalars as Python ones (configs check their types)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _decode(tensors: dict[str, Any], name: str, path: Path) -> Tensor:
    """Tensor `name` of the file as a float32 torch tensor in PyTorch's dimension order."""
    import gguf

    t = tensors.get(name)
    if t is None:
        raise UnsupportedError(f"{path}: the model needs tensor {name!r}, which the file lacks")
    q = gguf.GGMLQuantizationType
    try:
        if t.tensor_type in (q.F32, q.F16, q.BF16):
            array = (
                np.asarray(t.data, dtype=np.float32)
                if t.tensor_type != q.BF16
                else (gguf.quants.dequantize(t.data, t.tensor_type))
            )
        else:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as err:
        raise UnsupportedError(
            f"{path}: tensor {name!r} is stored as {t.tensor_type.name}, which moekit cannot "
            f"dequantise ({err})"
        ) from err
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
    return torch.from_numpy(np.ascontiguousarray(array).reshape(shape).copy())
