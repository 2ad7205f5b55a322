"""A moekit LoRA adapter in the PEFT library's format, for a model exported to Hugging Face.

For the architectures whose transformers modules mirror moekit's weights one to one (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE), every moekit adapter but those on dense MLP layers has a PEFT
counterpart on the transformers model built from `moekit convert --to-hf`:

- attention projections and shared experts are `nn.Linear` modules
  (`model.layers.{i}.self_attn.q_proj`, `...mlp.shared_expert.gate_proj`): plain PEFT LoRA
  (`target_modules`), A and B as they are;
- the router is a parameter (`model.layers.{i}.mlp.gate.weight`), and the routed experts are
  3-D parameters (`...mlp.experts.gate_up_proj`, E x 2F x D, and `...mlp.experts.down_proj`,
  E x D x F): PEFT's parameter LoRA (`target_parameters`), which keeps one rank-r adapter per
  expert in an (E·r x in) A and an (out x r·E) B. transformers fuses gate and up into one
  weight, so the gate and up adapters become one adapter of rank 2r on it (A stacked, B block
  diagonal, `rank_pattern` / `alpha_pattern` keep the scale alpha / r).

The transformers names are those of the architecture's in-memory weight table
(`Architecture.live_weights` in moekit.interop), the one the benchmarks load weights by.

PEFT's parameter LoRA has no dropout; the exported config says lora_dropout 0 (dropout only
acts in training). Adapters on dense MLP layers (a model with `first_dense_layers`) are
refused: PEFT maps gate_proj/up_proj/down_proj targets of these architectures onto the
experts. DeepSeek-V2 and V3 are not exported: their attention stores the rotary rows in
another order and their projections differ from moekit's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from moekit.config import ModelConfig
from moekit.files import write_json
from moekit.finetune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, read_adapter_config
from moekit.interop.architecture import Architecture
from moekit.model_dir import ModelDir

PEFT_ARCHITECTURES = (
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
)
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"  # PEFT's name (moekit's own adapter uses the same)
_PREFIX = "base_model.model."
_MLP = ("w_gate", "w_up", "w_down")

Factors = tuple[Tensor, Tensor]  # a LoRA adapter's (A, B)


@dataclass
class _PeftAdapter:
    """A PEFT adapter being put together: its tensors, and what its config must name."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)  # target_modules (nn.Linear)
    parameters: list[str] = field(default_factory=list)  # target_parameters
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def add(self, where: str, factors: Factors) -> None:
        """The factors of the adapter whose tensors PEFT keeps under module path `where`."""
        self.tensors[f"{_PREFIX}{where}.lora_A.weight"] = factors[0]
        self.tensors[f"{_PREFIX}{where}.lora_B.weight"] = factors[1]


def _adapter_source(source: Path) -> Path:
    """The adapter directory of `source`: itself, or the adapter/ of a fine-tuned model."""
    for candidate in (source, source / ModelDir.ADAPTER):
        if (candidate / ADAPTER_CONFIG).is_file() and (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    raise FileNotFoundError(
        f"{source} holds no LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, directly or "
        "in adapter/); a LoRA fine-tune (finetune.method='lora') writes one"
    )


def _read_adapter(src: Path) -> tuple[ModelConfig, LoRAConfig, dict[str, Tensor]]:
    """The base model's config, the LoRA settings and the tensors of the adapter in `src`."""
    from safetensors.torch import load_file

    meta = read_adapter_config(src)
    if "base_config" not in meta:
        raise ValueError(
            f"{src / ADAPTER_CONFIG} does not record the base model's config (base_config); "
            "save the adapter again with this version of moekit"
        )
    cfg = ModelConfig.from_dict(meta["base_config"])
    lora = LoRAConfig.from_dict(meta["lora"])
    try:
        state = load_file(str(src / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{src / ADAPTER_WEIGHTS} is not a readable safetensors file ({e})") from e
    return cfg, lora, state


def _peft_architecture(cfg: ModelConfig, architecture: str | None) -> Architecture:
    """The architecture the base `cfg` was exported as (`architecture`, or the one export
    picks), refused unless PEFT's modules of it mirror moekit's weights."""
    from moekit.interop.hf import architectures, choose_architecture

    if architecture is not None and architecture not in PEFT_ARCHITECTURES:
        raise ValueError(
            f"architecture={architecture!r}: PEFT export supports {', '.join(PEFT_ARCHITECTURES)}"
        )
    arch = architectures()[architecture] if architecture else choose_architecture(cfg)
    if arch.name not in PEFT_ARCHITECTURES:
        raise ValueError(
            f"PEFT export supports {', '.join(PEFT_ARCHITECTURES)}; this model exports as "
            f"{arch.name}"
        )
    problems = arch.problems(cfg)
    if problems:
        raise ValueError(f"the base model cannot be exported as {arch.name}: {'; '.join(problems)}")
    return arch


def _live_names(arch: Architecture, cfg: ModelConfig) -> dict[str, str]:
    """moekit weight name -> the name of the same weight in `arch`'s transformers model in
    memory (whose modules PEFT wraps), by the architecture's table; the two stacked expert
    weights fused in memory both name the fused one."""
    maps = arch.tensor_maps(cfg, arch.config_to_hf(cfg), live=True)
    return {ours: m.theirs[0] for m in maps for ours in m.ours}


def _linear_name(ours: str, names: dict[str, str]) -> str:
    """transformers' module name of a moekit linear layer, e.g. layers.0.attn.wq ->
    model.layers.0.self_attn.q_proj."""
    parts = ours.split(".")
    if len(parts) == 4 and parts[0] == "layers" and parts[2] == "ffn" and parts[3] in _MLP:
        # PEFT (0.21) rewrites any target ending in gate_proj / up_proj / down_proj of these
        # MoE architectures into the experts' fused parameters, so an adapter on a dense MLP
        # layer would land on the wrong weights.
        raise ValueError(
            f"the adapter on {ours} (a dense MLP layer) cannot be exported for PEFT: PEFT "
            "treats gate_proj/up_proj/down_proj targets of MoE architectures as expert "
            "weights; fine-tune without dense-MLP targets (e.g. finetune.lora.targets="
            "['*.attn.w*', '*.ffn.experts.*', '*.ffn.shared.*']) to export"
        )
    theirs = names.get(f"{ours}.weight", "")
    if not theirs.endswith(".weight"):
        raise ValueError(f"the adapter on {ours} has no PEFT counterpart")
    return theirs.removesuffix(".weight")


def _per_expert(A: Tensor, B: Tensor) -> Factors:
    """PEFT's layout of per-expert factors A (E, r, in), B (E, out, r): A as (E·r, in) with
    row e·r + j, B as (out, r·E) with column j·E + e."""
    E, r, _ = A.shape
    return A.reshape(E * r, -1), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def _fused_gate_up(gate: Factors | None, up: Factors | None, rank: int, F: int) -> Factors:
    """One rank-2r adapter on the fused (E, 2F, D) gate_up weight from the gate's and the up
    projection's rank-r adapters (a missing one contributes zeros)."""
    ref = gate if gate is not None else up
    assert ref is not None
    E, _, D = ref[0].shape
    A = ref[0].new_zeros(E, 2 * rank, D)
    B = ref[1].new_zeros(E, 2 * F, 2 * rank)
    for k, part in enumerate((gate, up)):
        if part is not None:
            A[:, k * rank : (k + 1) * rank] = part[0]
            B[:, k * F : (k + 1) * F, k * rank : (k + 1) * rank] = part[1]
    return A, B


def _add_linear_and_router(
    out: _PeftAdapter, state: dict[str, Tensor], names: dict[str, str]
) -> None:
    """The adapters of linear layers (PEFT's target_modules) and of routers (a parameter of
    transformers' gate module); expert adapters are left to `_add_experts`."""
    done: set[str] = set()
    for key in sorted(state):
        owner, _, leaf = key.rpartition(".")
        if owner in done or leaf not in ("A", "B", "mask"):
            continue
        done.add(owner)
        if owner.endswith(".lora"):  # a linear layer's adapter
            name = _linear_name(owner.removesuffix(".lora"), names)
            out.add(name, (state[f"{owner}.A"], state[f"{owner}.B"]))
            out.modules.append(name)
        elif owner.endswith(".router.adapter"):  # e.g. model.layers.0.mlp.gate.weight
            parameter = names[owner.removesuffix(".adapter") + ".weight"]
            out.add(parameter.removesuffix(".weight"), (state[f"{owner}.A"], state[f"{owner}.B"]))
            out.parameters.append(parameter)
        elif ".experts.adapters." not in owner:
            raise ValueError(f"the adapter tensor {key} has no PEFT counterpart")


def _add_experts(
    out: _PeftAdapter, state: dict[str, Tensor], names: dict[str, str], lora: LoRAConfig
) -> None:
    """The adapters of each layer's routed experts, on transformers' stacked parameters: gate
    and up as one rank-2r adapter on the fused gate_up parameter, down as it is."""
    r = lora.rank
    for index in sorted({int(k.split(".")[1]) for k in state if ".experts.adapters." in k}):
        prefix = f"layers.{index}.ffn.experts"

        def factors(proj: str, prefix: str = f"{prefix}.adapters") -> Factors | None:
            if f"{prefix}.{proj}.A" not in state:
                return None
            A, B = state[f"{prefix}.{proj}.A"], state[f"{prefix}.{proj}.B"]
            return A, B * state[f"{prefix}.{proj}.mask"].view(-1, 1, 1)

        gate, up, down = factors("w_gate"), factors("w_up"), factors("w_down")
        gate_up, down_name = names[f"{prefix}.w_gate"], names[f"{prefix}.w_down"]
        module = gate_up.rpartition(".")[0]  # e.g. model.layers.0.mlp.experts
        # PEFT nests one wrapper per parameter of a module, the first in parameter order
        # (gate_up_proj) innermost: its tensors sit under base_layer when down_proj also has one.
        inner = f"{module}.base_layer" if down is not None else module
        if gate is not None or up is not None:
            F = (gate or up)[1].shape[1]  # type: ignore[index]
            out.add(inner, _per_expert(*_fused_gate_up(gate, up, r, F)))
            out.parameters.append(gate_up)
            out.rank_pattern[gate_up] = 2 * r
            out.alpha_pattern[gate_up] = 2 * lora.alpha
        if down is not None:
            out.add(module, _per_expert(*down))
            out.parameters.append(down_name)


def _peft_config(adapter: _PeftAdapter, lora: LoRAConfig, base: str) -> dict[str, object]:
    """PEFT's adapter_config.json for `adapter` (base: the exported base's path or name)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # Exact module names (an empty list, not null: null would make PEFT pick its defaults).
        "target_modules": sorted(adapter.modules),
        "target_parameters": sorted(adapter.parameters),
        "rank_pattern": adapter.rank_pattern,
        "alpha_pattern": adapter.alpha_pattern,
        "modules_to_save": None,
        "layers_to_transform": None,
    }


@dataclass(frozen=True)
class PeftExport:
    """What `export_peft` wrote: the folder, the architecture the adapter fits, and the
    module and parameter names PEFT adapts (router and stacked-expert weights are
    parameters)."""

    out: Path
    architecture: str
    target_modules: list[str]
    target_parameters: list[str]


def export_peft(
    source: str | Path,
    out_dir: str | Path,
    *,
    architecture: str | None = None,
    base_model_name_or_path: str = "",
) -> PeftExport:
    """Write the LoRA adapter in `source` (an adapter directory, or a fine-tuned model directory
    holding adapter/) as a PEFT adapter (adapter_model.safetensors + adapter_config.json) for
    the base model exported to `architecture` (default: the one `moekit convert --to-hf`
    picks). `base_model_name_or_path` is recorded for PEFT to find the exported base."""
    from safetensors.torch import save_file

    src = _adapter_source(Path(source))
    cfg, lora, state = _read_adapter(src)
    arch = _peft_architecture(cfg, architecture)
    names = _live_names(arch, cfg)
    adapter = _PeftAdapter()
    _add_linear_and_router(adapter, state, names)
    _add_experts(adapter, state, names, lora)
    if not adapter.tensors:
        raise ValueError(f"{src} holds no adapter tensors")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in adapter.tensors.items()},
        str(out / PEFT_WEIGHTS),
        metadata={"format": "pt"},
    )
    write_json(out / PEFT_CONFIG, _peft_config(adapter, lora, base_model_name_or_path))
    return PeftExport(out, arch.name, sorted(adapter.modules), sorted(adapter.parameters))
