"""RoPE scaling in GGUF files, as llama.cpp reads and computes it.

Written: `{arch}.rope.scaling.type` ("yarn" or "linear"), `rope.scaling.factor`, and for YaRN
`rope.scaling.original_context_length`, `rope.scaling.attn_factor` (when the cos/sin factor is
not YaRN's default) and, for deepseek2, `rope.scaling.yarn_log_multiplier` (0.1 x
`mscale_all_dim`). llama.cpp computes YaRN's ramp as transformers does with `truncate`, with its
own fixed `beta_fast` 32 and `beta_slow` 1 for these architectures, and multiplies the
rotation by `attn_factor * (0.1 ln(factor) + 1)`. Its deepseek2 graph puts the magnitude
correction into the softmax scale assuming `mscale == mscale_all_dim`, which DeepSeek's own
checkpoints state. What it would compute differently is refused by name.

Llama 3 scaling is stored as llama.cpp's converter stores it, for the architectures whose
graphs read it ("llama", "llama4"): a `rope_freqs` tensor of per-dimension factors (each
unscaled frequency divided by the scaled one). The factors alone do not say which Llama 3
settings made them, so moekit writes those settings beside them under its own keys
(`moekit.rope.llama3.*`, which llama.cpp ignores) and, reading a file back, checks that they
reproduce the tensor. A file without them (llama.cpp's converter writes none) is read when one
of the published settings (`llama3_settings_of`) makes exactly its factors; on a tiny model
several may, all computing the same rotation, and the first is recorded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.config import ModelConfig, RopeScalingConfig
from moekit.nn.rope import inverse_frequencies

ROPE_FREQS = "rope_freqs.weight"
FREQ_FACTOR_ARCHS = ("llama", "llama4")  # llama.cpp graphs that read `rope_freqs`
# moekit's keys for the Llama 3 settings behind `rope_freqs` -> the Hugging Face field.
LLAMA3_KEYS = {
    "moekit.rope.llama3.factor": "factor",
    "moekit.rope.llama3.low_freq_factor": "low_freq_factor",
    "moekit.rope.llama3.high_freq_factor": "high_freq_factor",
    "moekit.rope.llama3.original_context_length": "original_max_position_embeddings",
}


def _magnitude(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_problems(cfg: ModelConfig, arch: str) -> list[str]:
    """What keeps llama.cpp's `arch` graph from computing `cfg`'s RoPE scaling exactly (empty:
    nothing)."""
    s, deepseek = cfg.rope_scaling, arch == "deepseek2"
    if s is None or s.kind == "linear":
        return []
    if s.kind == "llama3":
        if arch in FREQ_FACTOR_ARCHS:
            return []
        return [
            f"llama.cpp's {arch} graph reads no per-dimension RoPE factors, which Llama 3 "
            f"scaling needs ({s.describe()}; written for {' and '.join(FREQ_FACTOR_ARCHS)})"
        ]
    if s.kind != "yarn":
        return [f"moekit writes YaRN, linear and Llama 3 RoPE scaling to GGUF ({s.describe()})"]
    found = []
    if not s.truncate:
        found.append("llama.cpp rounds YaRN's ramp ends outwards (truncate must be true)")
    if (s.beta_fast, s.beta_slow) != (32.0, 1.0):
        found.append(
            f"llama.cpp uses YaRN's beta_fast 32 and beta_slow 1 here (not {s.beta_fast:g} and "
            f"{s.beta_slow:g})"
        )
    if deepseek and (s.mscale_all_dim is None or s.mscale != s.mscale_all_dim):
        found.append(
            "llama.cpp's deepseek2 graph assumes YaRN's mscale equals mscale_all_dim (both "
            f"set), as DeepSeek's checkpoints state (not {s.mscale} and {s.mscale_all_dim})"
        )
    if deepseek and s.attention_factor is not None:
        found.append("llama.cpp's deepseek2 graph has no explicit YaRN attention_factor")
    return found


def rope_meta(cfg: ModelConfig, deepseek: bool) -> dict[str, Any]:
    """The `{arch}.rope.scaling.*` metadata of `cfg` (check `rope_problems` first); for Llama 3
    scaling moekit's own keys (the factors travel as the `rope_freqs` tensor)."""
    s = cfg.rope_scaling
    if s is None:
        return {}
    if s.kind == "llama3":
        values = {
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
        return {key: values[field] for key, field in LLAMA3_KEYS.items()}
    meta: dict[str, Any] = {
        "{arch}.rope.scaling.type": s.kind,
        "{arch}.rope.scaling.factor": s.factor,
    }
    if s.kind == "yarn":
        meta["{arch}.rope.scaling.original_context_length"] = s.original_max_seq_len
        if deepseek:
            meta["{arch}.rope.scaling.yarn_log_multiplier"] = 0.1 * (s.mscale_all_dim or 0.0)
        else:
            ratio = s.cos_sin_factor() / _magnitude(s.factor)
            if not math.isclose(ratio, 1.0, rel_tol=1e-7):
                meta["{arch}.rope.scaling.attn_factor"] = ratio
    return meta


def rope_freq_factors(cfg: ModelConfig) -> Tensor | None:
    """The `rope_freqs` tensor of a model with Llama 3 scaling (None: any other): each
    dimension's unscaled frequency over its scaled one, as llama.cpp divides by it."""
    s = cfg.rope_scaling
    if s is None or s.kind != "llama3":
        return None
    return _llama3_factors(cfg.head_dim, cfg.rope_theta, s)


def _llama3_factors(head_dim: int, theta: float, s: RopeScalingConfig) -> Tensor:
    cpu = torch.device("cpu")
    plain = inverse_frequencies(head_dim, theta, cpu)
    return plain / inverse_frequencies(head_dim, theta, cpu, s)


def same_factors(a: Tensor, b: Tensor) -> bool:
    """Whether two `rope_freqs` tensors are the same factors (to float32 rounding)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=0)


# Llama 3 settings published checkpoints use, tried when a file has bare `rope_freqs`
# (pretrained context, low and high frequency factors): the powers of two from 4096 to 131072,
# with Llama 3.1's factors (1 and 4) and Llama 4 Scout's (1 and 1).
_PUBLISHED_LLAMA3 = [
    (original, low, high)
    for original in (8192, 4096, 16384, 32768, 65536, 131072)
    for low, high in ((1.0, 4.0), (1.0, 1.0))
]


def llama3_settings_of(factors: Tensor, head_dim: int, theta: float) -> dict[str, Any] | None:
    """The `moekit.rope.llama3.*` metadata of bare per-dimension factors (a file from
    llama.cpp's converter), when published Llama 3 settings (Llama 3.1's, Llama 4 Scout's and
    their pretrained contexts) make exactly these factors; None when none does."""
    factor = float(str(np.float32(factors.max().item())))
    for original, low, high in _PUBLISHED_LLAMA3:
        s = RopeScalingConfig(
            kind="llama3",
            factor=factor,
            original_max_seq_len=original,
            low_freq_factor=low,
            high_freq_factor=high,
        )
        if same_factors(_llama3_factors(head_dim, theta, s), factors):
            return dict(zip(LLAMA3_KEYS, (factor, low, high, original), strict=True))
    return None


def rope_scaling_of(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """The Hugging Face `rope_scaling` a file's metadata states (None: unscaled); a
    ValueError naming a scaling type moekit does not read."""
    if LLAMA3_KEYS.keys() <= meta.keys():
        scaling: dict[str, Any] = {"rope_type": "llama3"}
        for key, field in LLAMA3_KEYS.items():
            value = meta[key]
            scaling[field] = float(str(np.float32(value))) if isinstance(value, float) else value
        return scaling
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(str(meta.get(f"{arch}.rope.scaling.factor", 1.0)))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind != "yarn":
        raise ValueError(
            f"GGUF metadata {arch}.rope.scaling.type={kind!r} is not supported: moekit reads "
            "yarn and linear RoPE scaling"
        )
    scaling = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": meta[f"{arch}.rope.scaling.original_context_length"],
    }
    log_mul = meta.get(f"{arch}.rope.scaling.yarn_log_multiplier")
    if log_mul:
        m = round(log_mul / 0.1, 6)
        scaling["mscale"] = scaling["mscale_all_dim"] = m
    attn = meta.get(f"{arch}.rope.scaling.attn_factor")
    if attn is not None:
        scaling["attention_factor"] = round(attn * _magnitude(factor), 7)
    return scaling
