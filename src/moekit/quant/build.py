"""Quantised models: which weights a `QuantizationConfig` quantises, swapping the model's
modules for quantised ones (from float weights, or empty before loading), and quantising a
stream of named float tensors one at a time (what writing a quantised directory needs).

`meta_model` and `build_model` are `moekit.model`'s, aware of `ModelConfig.quantization`:
loading a quantised directory builds the quantised modules first and loads into them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit import model as float_model
from moekit.config import ModelConfig, QuantizationConfig
from moekit.moe.experts import Experts
from moekit.moe.router import Router
from moekit.quant import formats
from moekit.quant.experts import PROJECTIONS, QuantExperts
from moekit.quant.weight import QuantLinear, QuantWeight


@dataclass(frozen=True)
class Targets:
    """The modules a quantisation replaces, by their path in the model: stacked experts, and
    (parts "all") the linear layers other than routers and the one-output shared-expert gate."""

    experts: tuple[str, ...]
    linears: tuple[str, ...]

    def prefix(self, tensor: str) -> str | None:
        """The stored name prefix of float tensor `tensor` when it is quantised, else None:
        `P.w_up` of experts P stays `P.w_up`; `L.weight` of linear L becomes `L`."""
        parent, _, leaf = tensor.rpartition(".")
        if parent in self.experts and leaf in PROJECTIONS:
            return tensor
        if parent in self.linears and leaf == "weight":
            return parent
        return None


def targets(model: nn.Module, parts: str) -> Targets:
    """What quantising `model` with `parts` ("experts" or "all") replaces."""
    experts, linears = [], []
    skip: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, Router):
            skip.append(name + ".")
        if isinstance(module, Experts):
            experts.append(name)
        elif parts == "all" and isinstance(module, nn.Linear):
            gate = module.out_features == 1  # MoELayer.shared_gate: a scalar per token
            if not gate and not any(name.startswith(s) for s in skip):
                linears.append(name)
    return Targets(tuple(experts), tuple(linears))


def check_shapes(model: nn.Module, found: Targets, q: QuantizationConfig) -> None:
    """ValueError naming the first tensor whose input dimension the group size does not
    divide (or, for 4 bits, that has an odd one)."""
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for name, shape in shapes.items():
        if found.prefix(name) is not None:
            formats.check_divides(name, shape, q.bits, q.group_size)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def swap_modules(model: float_model.Transformer, q: QuantizationConfig) -> None:
    """Replace the modules `q` quantises by quantised ones, in place: from their float
    weights, or empty ones on the meta device (to be loaded)."""
    found = targets(model, q.parts)
    check_shapes(model, found, q)
    bits, group = q.bits, q.group_size
    for path in found.experts:
        experts = model.get_submodule(path)
        assert isinstance(experts, Experts)
        _set(model, path, QuantExperts.like(experts, bits, group))
    for path in found.linears:
        lin = model.get_submodule(path)
        assert isinstance(lin, nn.Linear)
        _set(model, path, QuantLinear.from_linear(lin, bits, group))


def quantize_model(
    model: float_model.Transformer, q: QuantizationConfig
) -> float_model.Transformer:
    """Quantise a float model in place (its config records `q`); returns it."""
    if model.cfg.quantization is not None:
        raise ValueError(already_quantized(model.cfg.quantization))
    swap_modules(model, q)
    model.cfg = _with(model.cfg, q)
    return model


def already_quantized(q: QuantizationConfig) -> str:
    group = f", group size {q.group_size}" if q.group_size else ""
    return (
        f"the model is already quantised ({q.bits}-bit{group}, parts {q.parts!r}); "
        "quantise its float original instead"
    )


def _with(cfg: ModelConfig, q: QuantizationConfig | None) -> ModelConfig:
    return ModelConfig.from_dict({**cfg.to_dict(), "quantization": q and q.to_dict()})


def meta_model(cfg: ModelConfig) -> float_model.Transformer:
    """`moekit.model.meta_model`, with quantised modules where `cfg.quantization` says."""
    model = float_model.meta_model(_with(cfg, None) if cfg.quantization else cfg)
    if cfg.quantization is not None:
        swap_modules(model, cfg.quantization)
        model.cfg = cfg
    return model


def build_model(
    cfg: ModelConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> float_model.Transformer:
    """`moekit.model.build_model`; a quantised config gives the quantised model with its
    tensors allocated but not initialised (load its weights into it)."""
    if cfg.quantization is None:
        return float_model.build_model(cfg, device=device, dtype=dtype, seed=seed)
    from moekit.runtime import resolve_device

    model = meta_model(cfg)
    target = resolve_device(device)
    float_model.check_memory(model, target)
    model.to_empty(device=target)
    return float_model.cast_model(model, dtype)


def quantize_tensors(
    tensors: Iterator[tuple[str, Tensor]], found: Targets, q: QuantizationConfig
) -> Iterator[tuple[str, Tensor]]:
    """The stored tensors of a quantised model from its float ones, one tensor at a time:
    targets become their `formats` parts, everything else passes through unchanged."""
    for name, t in tensors:
        prefix = found.prefix(name)
        if prefix is None:
            yield name, t
            continue
        formats.check_divides(name, tuple(t.shape), q.bits, q.group_size)
        for part, value in formats.quantize(t, q.bits, q.group_size).items():
            yield f"{prefix}.{part}", value


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Use `kernel` (one of `moekit.quant.weight.KERNELS`: "auto", "torch", "dequant" or
    "compiled"; see that module) for every quantised weight of `model`."""
    from moekit.quant.weight import KERNELS

    if kernel not in KERNELS:
        raise ValueError(f"unknown quantised kernel {kernel!r}; choose one of {KERNELS}")
    for module in model.modules():
        if isinstance(module, QuantWeight):
            module.kernel = kernel
