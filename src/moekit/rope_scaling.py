"""`RopeScalingConfig`: RoPE stretched to a longer context than a model was pretrained on
(`ModelConfig.rope_scaling`), as YaRN, linear interpolation or Llama 3's scaling.

Plain data, validated on construction like every config; `moekit.nn.rope` turns it into
rotation tables and multi-head latent attention reads its softmax factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from moekit.validate import (
    ConfigBase,
    check_choice,
    check_field_types,
    check_non_negative,
    check_positive,
    fail,
)

ROPE_SCALINGS = ("yarn", "linear", "llama3")

# The fields each kind reads besides `kind` and `factor`; the others keep their defaults.
_USES = {
    "yarn": (
        "original_max_seq_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
        "attention_factor", "truncate",
    ),
    "linear": (),
    "llama3": ("original_max_seq_len", "low_freq_factor", "high_freq_factor"),
}  # fmt: skip


@dataclass(kw_only=True)
class RopeScalingConfig(ConfigBase):
    """RoPE scaled to `factor` times the context the model was pretrained on.

    - `kind="yarn"` (DeepSeek-V2/V3, long-context Qwen): the fast-rotating dimensions keep
      their frequencies, the slow ones are divided by `factor`, blended over a ramp between the
      dimensions that turn `beta_fast` and `beta_slow` times over `original_max_seq_len`
      positions (the ramp's ends rounded outwards when `truncate`). The cos/sin tables are
      multiplied by `attention_factor`, by default `m(mscale) / m(mscale_all_dim)` with
      `m(s) = 0.1 * s * ln(factor) + 1` when both are set, else `m(1)`. Multi-head latent
      attention (DeepSeek) also multiplies its softmax scale by `m(mscale_all_dim)**2` when
      `mscale_all_dim` is set.
    - `kind="linear"`: every frequency divided by `factor` (position interpolation).
    - `kind="llama3"`: dimensions whose wavelength is shorter than `original_max_seq_len /
      high_freq_factor` positions keep their frequency, those longer than `original_max_seq_len
      / low_freq_factor` are divided by `factor`, and the ones between are blended smoothly.
    """

    kind: str = "yarn"
    factor: float
    original_max_seq_len: int | None = None  # yarn and llama3: the pretrained context
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # None: from factor, mscale and mscale_all_dim
    truncate: bool = True
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3

    def __post_init__(self) -> None:
        owner = "RopeScalingConfig"
        check_field_types(self)
        check_choice(owner, "kind", self.kind, ROPE_SCALINGS)
        check_positive(owner, factor=self.factor)
        if self.factor < 1:
            raise fail(owner, "factor", self.factor, "must be >= 1 (the context is stretched)")
        used = ("kind", "factor", *_USES[self.kind])
        for f in fields(self):  # a field the kind does not read must keep its default
            value = getattr(self, f.name)
            if f.name not in used and value != f.default:
                raise fail(owner, f.name, value, f"is not used with kind={self.kind!r}")
        if self.kind != "linear":
            if self.original_max_seq_len is None:
                raise fail(owner, "original_max_seq_len", None, f"is needed by kind={self.kind!r}")
            check_positive(owner, original_max_seq_len=self.original_max_seq_len)
        if self.kind == "yarn":
            self._check_yarn()
        elif self.kind == "llama3":
            self._check_llama3()

    def _check_yarn(self) -> None:
        owner = "RopeScalingConfig"
        check_positive(owner, beta_fast=self.beta_fast, beta_slow=self.beta_slow)
        if self.beta_fast < self.beta_slow:
            raise fail(
                owner, "beta_fast", self.beta_fast, f"must be >= beta_slow ({self.beta_slow})"
            )
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                check_non_negative(owner, **{name: getattr(self, name)})
        if self.attention_factor is not None:
            check_positive(owner, attention_factor=self.attention_factor)

    def _check_llama3(self) -> None:
        owner = "RopeScalingConfig"
        for name in ("low_freq_factor", "high_freq_factor"):
            if getattr(self, name) is None:
                raise fail(owner, name, None, "is needed by kind='llama3'")
        assert self.low_freq_factor is not None and self.high_freq_factor is not None
        check_positive(owner, low_freq_factor=self.low_freq_factor)
        # Equal factors (Llama 4 Scout): no blended band, a plain cut at one wavelength.
        if self.high_freq_factor < self.low_freq_factor:
            raise fail(
                owner, "high_freq_factor", self.high_freq_factor,
                f"must be >= low_freq_factor ({self.low_freq_factor})",
            )  # fmt: skip

    def magnitude(self, mscale: float) -> float:
        """YaRN's magnitude correction `0.1 * mscale * ln(factor) + 1` (1 when not stretched)."""
        if self.factor <= 1:
            return 1.0
        return 0.1 * mscale * math.log(self.factor) + 1.0

    def cos_sin_factor(self) -> float:
        """What the cos and sin tables are multiplied by (1 but for YaRN)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.magnitude(self.mscale) / self.magnitude(self.mscale_all_dim)
        return self.magnitude(1.0)

    def softmax_factor(self) -> float:
        """What multi-head latent attention multiplies its softmax scale by."""
        return self.magnitude(self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

    def key(self) -> tuple[tuple[str, Any], ...]:
        """Its settings as a hashable value (the rotation tables are cached by it)."""
        return tuple(self.to_dict().items())

    def describe(self) -> str:
        """In words, e.g. "YaRN x40 from 4096 positions" (the context it was pretrained on)."""
        name = {"yarn": "YaRN", "linear": "linear", "llama3": "Llama 3"}[self.kind]
        start = "" if self.original_max_seq_len is None else f" from {self.original_max_seq_len}"
        return f"{name} x{self.factor:g}{start}{' positions' if start else ''}"
