"""LoRA: low-rank adapters on attention, dense and shared MLPs, the routed experts and the router.

A targeted weight W (out x in) gains a trainable update `scale * B @ A` (A: rank x in,
B: out x rank, B starting at zero so training starts from the base model, scale = alpha /
rank); the base weights freeze. Routed experts get one adapter per expert over their stacked
weights: A is (E, rank, in) and B (E, out, rank), and the update is computed per expert in the
same batched way as the projection itself (grouped GEMMs over the expert-sorted rows), never
by a loop over tokens. `experts` limits the adapters to some experts (the others' updates stay
exactly zero).

Targets are shell-style patterns over weight names: `layers.3.attn.wq`, `layers.3.ffn.w_up`
(a dense MLP), `layers.3.ffn.shared.w_down`, `layers.3.ffn.experts.w_gate` (stacked experts),
`layers.3.ffn.router`.

The adapter is saved alone (adapter.safetensors + adapter_config.json), loads onto a model
built from the base directory, and merges into the base weights (and unmerges back).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.finetune.config import LoRAConfig
from moekit.model_dir import ModelDir
from moekit.moe.experts import Experts, grouped_linear
from moekit.moe.router import Router

ADAPTER_WEIGHTS = ModelDir.ADAPTER_WEIGHTS
ADAPTER_CONFIG = ModelDir.ADAPTER_CONFIG


class LowRank(nn.Module):
    """The update of one (out x in) weight: `scale * B @ A`."""

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(cfg.rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, cfg.rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        return (
            F.linear(F.linear(self.dropout(x), self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale
        )

    def delta(self) -> Tensor:
        return (self.B @ self.A) * self.scale


class ExpertLowRank(nn.Module):
    """Per-expert updates of a stacked (E, out, in) weight, batched like the experts."""

    mask: Tensor

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, cfg: LoRAConfig
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(num_experts, cfg.rank, in_features))
        self.B = nn.Parameter(torch.zeros(num_experts, out_features, cfg.rank))
        for e in range(num_experts):
            nn.init.kaiming_uniform_(self.A.data[e], a=math.sqrt(5))
        mask = torch.ones(num_experts)
        if cfg.experts is not None:
            beyond = [e for e in cfg.experts if e >= num_experts]
            if beyond:
                raise ValueError(
                    f"LoRAConfig.experts={cfg.experts}: the model has {num_experts} routed "
                    f"experts (0 .. {num_experts - 1}); {beyond} do not exist"
                )
            mask.zero_()
            mask[cfg.experts] = 1.0
        self.register_buffer("mask", mask)
        self.scale = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout)
        self.merged = False

    def _masked_b(self) -> Tensor:
        # Masking B (not the output) keeps the gradient of unadapted experts exactly zero.
        return self.B * self.mask.view(-1, 1, 1)

    def grouped(self, x_SI: Tensor, counts_E: Tensor) -> Tensor:
        if self.merged:
            return x_SI.new_zeros(x_SI.shape[0], self.B.shape[1])
        h_SR = grouped_linear(self.dropout(x_SI), self.A, counts_E)
        return grouped_linear(h_SR, self._masked_b(), counts_E) * self.scale

    def one(self, x_NI: Tensor, e: int) -> Tensor:
        if self.merged:
            return x_NI.new_zeros(x_NI.shape[0], self.B.shape[1])
        return F.linear(F.linear(self.dropout(x_NI), self.A[e]), self._masked_b()[e]) * self.scale

    def gathered(self, x_S1I: Tensor, expert_S: Tensor) -> Tensor:
        if self.merged:
            return x_S1I.new_zeros(x_S1I.shape[0], 1, self.B.shape[1])
        h = torch.bmm(self.dropout(x_S1I), self.A[expert_S].transpose(1, 2))
        return torch.bmm(h, self._masked_b()[expert_S].transpose(1, 2)) * self.scale

    def delta(self) -> Tensor:
        return torch.bmm(self._masked_b(), self.A) * self.scale


def _linear_hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
    lora: LowRank = module.lora  # type: ignore[assignment]
    return output if lora.merged else output + lora(args[0])


def _matches(name: str, targets: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in targets)


@dataclass
class AdapterSummary:
    targets: list[str]
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> AdapterSummary:
    """Freeze `model`, attach adapters to every weight `cfg.targets` matches, and return what
    was adapted with the trainable and total parameter counts. A pattern set that matches
    nothing is an error (LoRA never silently adapts nothing)."""
    if any(True for _ in adapter_modules(model)):
        raise ValueError("the model already carries LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _matches(name, cfg.targets):
            module.lora = LowRank(module.in_features, module.out_features, cfg).to(
                module.weight.device
            )
            module.register_forward_hook(_linear_hook)
            adapted.append(name)
        elif isinstance(module, Experts):
            for proj in ("w_gate", "w_up", "w_down"):
                weight = getattr(module, proj)
                if weight is not None and _matches(f"{name}.{proj}", cfg.targets):
                    E, out, inp = weight.shape
                    module.adapters[proj] = ExpertLowRank(E, inp, out, cfg).to(weight.device)
                    adapted.append(f"{name}.{proj}")
        elif isinstance(module, Router) and _matches(name, cfg.targets):
            E, dim = module.weight.shape
            module.adapter = LowRank(dim, E, cfg).to(module.weight.device)
            adapted.append(name)
    if not adapted:
        raise ValueError(
            f"LoRA targets {cfg.targets} match no weight of this model; weight names look like "
            "layers.0.attn.wq, layers.0.ffn.experts.w_up, layers.0.ffn.router"
        )
    trainable = 0
    for _, adapter in adapter_modules(model):
        for p in adapter.parameters():
            p.requires_grad_(True)
            # An expert outside `cfg.experts` keeps its (zero-gradient) slices: not trained.
            share = adapter.mask.mean().item() if isinstance(adapter, ExpertLowRank) else 1.0
            trainable += round(p.numel() * share)
    return AdapterSummary(adapted, trainable, sum(p.numel() for p in model.parameters()))


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, LowRank | ExpertLowRank]]:
    for name, module in model.named_modules():
        if isinstance(module, LowRank | ExpertLowRank):
            yield name, module


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors (A, B and expert masks), by their names in the model."""
    names = {name for name, _ in adapter_modules(model)}
    return {k: v.detach() for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] in names}


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's own tensors, without any adapter's."""
    skip = set(adapter_state(model))
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def _targets_of(model: nn.Module) -> Iterator[tuple[Tensor, Any]]:
    """(the base weight, its adapter) for every adapter."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and isinstance(getattr(module, "lora", None), LowRank):
            yield module.weight, module.lora
        elif isinstance(module, Experts):
            for proj, adapter in module.adapters.items():
                yield getattr(module, proj), adapter
        elif isinstance(module, Router) and module.adapter is not None:
            yield module.weight, module.adapter


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Add every adapter's update into its base weight (the adapters then add nothing)."""
    for weight, adapter in _targets_of(model):
        if not adapter.merged:
            weight.add_(adapter.delta().to(weight.dtype))
            adapter.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`: subtract each update from its base weight again."""
    for weight, adapter in _targets_of(model):
        if adapter.merged:
            weight.sub_(adapter.delta().to(weight.dtype))
            adapter.merged = False


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, Tensor]:
    """The base weights with every update added, without touching the model."""
    state = base_state(model)
    by_id = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    for weight, adapter in _targets_of(model):
        key = by_id[id(weight)]
        if not adapter.merged:
            state[key] = state[key] + adapter.delta().to(weight.dtype)
    return state


def save_adapter(
    model: nn.Module, cfg: LoRAConfig, directory: str | Path, *, base: str = ""
) -> Path:
    """Write adapter.safetensors and adapter_config.json into `directory`."""
    from moekit.files import atomic_write_text
    from moekit.model_dir import save_weights
    from moekit.version import __version__

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model)
    if not state:
        raise ValueError("the model carries no adapters to save")
    save_weights(state, out, metadata={"moekit_version": __version__})
    (out / ModelDir.WEIGHTS).rename(out / ADAPTER_WEIGHTS)
    config: dict[str, Any] = {"moekit_version": __version__, "lora": cfg.to_dict(),
                              "base_model": base, "tensors": len(state)}  # fmt: skip
    model_cfg = getattr(model, "cfg", None)
    if model_cfg is not None and hasattr(model_cfg, "to_dict"):
        # The base model's config travels with the adapter, so it can be exported (PEFT)
        # and checked against a base without the base directory at hand.
        config["base_config"] = model_cfg.to_dict()
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The adapter_config.json of an adapter directory; a missing or malformed file is an
    error naming it."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(config, dict) or not isinstance(config.get("lora"), dict):
        raise ValueError(f"{path} is not a moekit adapter config (no 'lora' section)")
    return config


def load_adapter(model: nn.Module, directory: str | Path) -> LoRAConfig:
    """Attach the adapter saved in `directory` to `model` (built from its base) and return
    its config. Tensors that do not fit are named."""
    from safetensors.torch import load_file

    src = Path(directory)
    cfg = LoRAConfig.from_dict(read_adapter_config(src)["lora"])
    apply_lora(model, cfg)
    try:
        state = load_file(str(src / ADAPTER_WEIGHTS))
    except Exception as e:
        raise ValueError(f"{src / ADAPTER_WEIGHTS} is not a readable safetensors file ({e})") from e
    own = adapter_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshapen = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"the adapter in {src} does not fit this model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, misshapen {misshapen[:3]}"
        )
    live = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            live[k].copy_(v)
    return cfg


def load_adapted(
    base_dir: str | Path,
    adapter_dir: str | Path,
    *,
    merge: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The model in `base_dir` with the adapter in `adapter_dir` attached (and merged into the
    weights with `merge`). An adapter trained on another base is refused, naming what differs."""
    from moekit.config import ModelConfig
    from moekit.model_dir import load_model

    base = ModelDir(base_dir).config()
    recorded = read_adapter_config(adapter_dir).get("base_config")
    if recorded is not None:
        theirs = ModelConfig.from_dict(recorded).to_dict()
        ours = base.to_dict()
        differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if differing:
            raise ValueError(
                f"the adapter in {adapter_dir} was trained on another model than {base_dir}: "
                f"{', '.join(differing)} differ"
            )
    model = load_model(base_dir, device=device)
    load_adapter(model, adapter_dir)
    if merge:
        merge_lora(model)
    return model
