"""What each supported architecture carries, read from its own tables (`moekit convert
--list`): the config.json fields it converts, what it fixes or refuses, and the GGUF
architecture llama.cpp runs it as."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moekit.interop.fields import Check, Const, Field, Fixed, Only


@dataclass(frozen=True)
class CatalogEntry:
    """One architecture: its Hugging Face class and model type, the GGUF architecture (None:
    not written to GGUF), the settings carried and the limits (fixed or refused settings)."""

    name: str
    model_type: str
    gguf: str | None
    carried: list[str]
    limits: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def catalog() -> list[CatalogEntry]:
    """Every architecture `moekit convert` supports, in the order export tries them."""
    from moekit.interop.gguf import gguf_architectures
    from moekit.interop.gguf_rope import FREQ_FACTOR_ARCHS
    from moekit.interop.hf import ARCHITECTURES

    gguf_of = {g.hf.name: g for g in gguf_architectures()}
    out = []
    for arch in ARCHITECTURES:
        carried, limits = [], []
        for entry in arch.config:
            limits += entry.limits()
            if isinstance(entry, Field):
                carried.append(entry.hf)
            elif not isinstance(entry, Fixed | Check | Only | Const):
                carried += [n for n in entry.hf_names() if n not in carried]
        g = gguf_of.get(arch.name)
        if g is not None:
            if g.norm_topk_prob is not None:
                state = "renormalised" if g.norm_topk_prob else "not renormalised"
                limits.append(f"GGUF ({g.name}): the chosen experts' weights are {state}")
            dense = "leading dense layers only" if g.leading_dense else "no dense layers"
            if g.stepped_dense:
                dense = "MoE every interleave_moe_layer_step-th layer, dense layers between"
            llama3 = "Llama 3" if g.name in FREQ_FACTOR_ARCHS else "not Llama 3"
            limits.append(
                f"GGUF ({g.name}): {dense}; RoPE scaling: linear, YaRN with its ramp truncated "
                f"and beta_fast 32, beta_slow 1, {llama3}"
            )
            limits += [f"GGUF ({g.name}): {note}" for note in g.notes]
        out.append(
            CatalogEntry(
                arch.name,
                arch.model_type,
                g.name if g else None,
                [", ".join(sorted(set(carried)))],
                list(dict.fromkeys(limits)),
            )
        )
    return out
