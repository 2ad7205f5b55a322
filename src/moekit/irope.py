"""`IRoPEConfig`: attention that interleaves RoPE and NoPE layers (`ModelConfig.irope`), as
Llama 4 does.

Most layers rotate queries and keys (RoPE) and, with `chunk_size`, attend only to the keys of
their own chunk of positions; the `nope_layers` use no position encoding at all and attend to
the whole causal context, optionally with a query temperature that grows with the position.
Plain data, validated on construction like every config; `moekit.nn.irope` implements it.
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.validate import ConfigBase, check_field_types, check_non_negative, check_positive, fail


@dataclass(kw_only=True)
class IRoPEConfig(ConfigBase):
    """Interleaved RoPE / NoPE attention.

    - `nope_layers`: the layers without RoPE (Llama 4: every fourth, 3, 7, 11, ...). They
      attend to every earlier position.
    - `chunk_size`: the RoPE layers' queries see only keys in their own chunk of `chunk_size`
      positions (position // chunk_size equal), causally; None: the whole causal context.
    - `temperature_tuning`: the NoPE layers multiply each query at position p by
      `1 + attn_scale * log(1 + floor((p + 1) / floor_scale))`, sharpening attention far into
      a long context.
    - `qk_l2_norm`: the RoPE layers normalise each query and key head to unit root mean
      square (no learned gain, epsilon `ModelConfig.norm_eps`) after the rotation.
    """

    nope_layers: list[int]
    chunk_size: int | None = None
    temperature_tuning: bool = False
    floor_scale: int = 8192
    attn_scale: float = 0.1
    qk_l2_norm: bool = False

    def __post_init__(self) -> None:
        owner = "IRoPEConfig"
        check_field_types(self)
        layers = self.nope_layers
        if not isinstance(layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
        ):
            raise fail(owner, "nope_layers", layers, "must be a list of layer indices (>= 0)")
        if len(set(layers)) != len(layers):
            raise fail(owner, "nope_layers", layers, "names a layer twice")
        if self.chunk_size is not None:
            check_positive(owner, chunk_size=self.chunk_size)
        check_positive(owner, floor_scale=self.floor_scale)
        check_non_negative(owner, attn_scale=self.attn_scale)

    def describe(self) -> str:
        """In words, e.g. "NoPE layers 3, 7, 11 (3 of them); chunks of 8192; temperature
        tuning; L2 q/k norms"."""
        shown = ", ".join(map(str, self.nope_layers[:6])) + (
            ", ..." if len(self.nope_layers) > 6 else ""
        )
        parts = [f"NoPE layers {shown or 'none'} ({len(self.nope_layers)} of them)"]
        if self.chunk_size is not None:
            parts.append(f"chunks of {self.chunk_size}")
        if self.temperature_tuning:
            parts.append("temperature tuning")
        if self.qk_l2_norm:
            parts.append("L2 q/k norms")
        return "; ".join(parts)

    def uses_rope(self, layer: int) -> bool:
        return layer not in self.nope_layers

    def chunked(self, layer: int) -> bool:
        """Whether `layer` attends within chunks (a RoPE layer, with a chunk size)."""
        return self.chunk_size is not None and self.uses_rope(layer)

    def temperature(self, layer: int) -> bool:
        """Whether `layer` scales its queries by position (a NoPE layer, with tuning on)."""
        return self.temperature_tuning and not self.uses_rope(layer)


def every_nth_nope(num_layers: int, interval: int) -> list[int]:
    """The NoPE layers of a model whose every `interval`-th layer has no RoPE (Llama 4's
    `no_rope_layer_interval`): interval-1, 2*interval-1, ..."""
    return [i for i in range(num_layers) if (i + 1) % interval == 0]
