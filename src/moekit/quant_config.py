"""`QuantizationConfig`: how a stored model's weights are quantised (`ModelConfig.quantization`),
plain data validated on construction like every config; moekit.quant reads and writes the
weights it describes."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.validate import ConfigBase, check_choice, check_field_types, fail

QUANT_BITS = (8, 4)
QUANT_PARTS = ("experts", "all")
QUANT_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(kw_only=True)
class QuantizationConfig(ConfigBase):
    """Weight-only quantisation of a stored model (see moekit.quant).

    bits 8: int8, one float32 scale per output channel. bits 4: int4 in groups of
    `group_size` input columns, a float32 scale and minimum per group. `parts` says what is
    quantised: "experts" (the routed experts) or "all" (every linear layer but the routers;
    embeddings and norms stay float)."""

    bits: int
    group_size: int | None = None  # bits 4 only; None: 32
    parts: str = "experts"

    def __post_init__(self) -> None:
        owner = "QuantizationConfig"
        check_field_types(self)
        if self.bits not in QUANT_BITS:
            raise fail(owner, "bits", self.bits, "must be 8 or 4 (the bit widths moekit reads)")
        check_choice(owner, "parts", self.parts, QUANT_PARTS)
        if self.bits == 8:
            self.group_size = None  # int8 scales are per output channel
        elif self.group_size is None:
            self.group_size = 32
        elif self.group_size not in QUANT_GROUP_SIZES:
            allowed = ", ".join(map(str, QUANT_GROUP_SIZES))
            raise fail(owner, "group_size", self.group_size, f"must be one of {allowed}")

    def describe(self) -> str:
        """In words, e.g. "int4 (groups of 32), experts"."""
        group = f" (groups of {self.group_size})" if self.group_size else ""
        return f"int{self.bits}{group}, {self.parts}"
