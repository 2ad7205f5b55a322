"""transformers models in memory, holding a moekit model's weights (for benchmarks and
side-by-side checks): an architecture's config object, its in-memory state dict (by the
architecture's `live_weights` table), and the model itself. transformers is imported only
here, inside the functions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moekit.config import ModelConfig
from moekit.interop.architecture import Architecture


def hf_config(arch: Architecture, cfg: ModelConfig) -> Any:
    """transformers' config object of `arch` for `cfg` (UnsupportedError when `arch` cannot
    represent `cfg` exactly)."""
    from transformers import AutoConfig

    arch.check(cfg)
    fields = arch.config_to_hf(cfg)
    # Stated in rope_parameters, which transformers 5 reads (the transformers 4 spellings
    # would win over it).
    fields.pop("rope_theta")
    fields.pop("rope_scaling", None)
    return AutoConfig.for_model(arch.model_type, **fields)


def to_hf_state(
    arch: Architecture, state: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """The moekit weights `state` of a model `cfg` as the state dict of `arch`'s transformers
    model in memory."""
    arch.check(cfg)
    hf = arch.config_to_hf(cfg)
    out: dict[str, torch.Tensor] = {}
    for m in arch.tensor_maps(cfg, hf, live=True):
        tensors = m.to_theirs([state[name] for name in m.ours])
        out.update(zip(m.theirs, tensors, strict=True))
    return out


def to_hf_model(arch: Architecture, model: torch.nn.Module, cfg: ModelConfig) -> Any:
    """`arch`'s transformers model (e.g. MixtralForCausalLM), in eval mode, holding the weights
    of the moekit `model` built from `cfg`."""
    import transformers

    hf = getattr(transformers, arch.name)(hf_config(arch, cfg)).eval()
    missing, unexpected = hf.load_state_dict(
        to_hf_state(arch, model.state_dict(), cfg), strict=False
    )
    if missing or unexpected:
        raise ValueError(f"weight map incomplete: missing {missing}, unexpected {unexpected}")
    return hf
