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

PEFT's parameter LoRA has no dropout; the exported config says lora_dropout 0 (dropout only
acts in training). Adapters on dense MLP layers (a model with `first_dense_layers`) are
refused: PEFT maps gate_proj/up_proj/down_proj targets of these architectures onto the
experts. DeepSeek-V3 is not exported: its attention stores the rotary rows in another order
and its projections differ from moekit's.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from moekit.config import ModelConfig
from moekit.finetune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, read_adapter_config
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
_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_MLP = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}


def _adapter_source(source: Path) -> Path:
    """The adapter directory of `source`: itself, or the adapter/ of a fine-tuned model."""
    for candidate in (source, source / ModelDir.ADAPTER):
        if (candidate / ADAPTER_CONFIG).is_file() and (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    raise FileNotFoundError(
        f"{source} holds no LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, directly or "
        "in adapter/); fine-tune with --method lora to get one"
    )


def _linear_name(ours: str) -> str:
    """transformers' module name of a moekit linear layer, e.g. layers.0.attn.wq ->
    model.layers.0.self_attn.q_proj."""
    parts = ours.split(".")
    if len(parts) == 4 and parts[0] == "layers" and parts[2] == "attn" and parts[3] in _ATTN:
        return f"model.layers.{parts[1]}.self_attn.{_ATTN[parts[3]]}"
    if len(parts) == 4 and parts[0] == "layers" and parts[2] == "ffn" and parts[3] in _MLP:
        # PEFT (0.21) rewrites any target ending in gate_proj / up_proj / down_proj of these
        # MoE architectures into the experts' fused parameters, so an adapter on a dense MLP
        # layer would land on the wrong weights.
        raise ValueError(
            f"the adapter on {ours} (a dense MLP layer) cannot be exported for PEFT: PEFT "
            "treats gate_proj/up_proj/down_proj targets of MoE architectures as expert "
            "weights; fine-tune without dense-MLP targets (e.g. --lora-targets "
            "'*.attn.w*,*.ffn.experts.*,*.ffn.shared.*') to export"
        )
    if len(parts) == 5 and parts[2:4] == ["ffn", "shared"] and parts[4] in _MLP:
        return f"model.layers.{parts[1]}.mlp.shared_expert.{_MLP[parts[4]]}"
    raise ValueError(f"the adapter on {ours} has no PEFT counterpart")


def _per_expert(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """PEFT's layout of per-expert factors A (E, r, in), B (E, out, r): A as (E·r, in) with
    row e·r + j, B as (out, r·E) with column j·E + e."""
    E, r, _ = A.shape
    return A.reshape(E * r, -1), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def _fused_gate_up(
    gate: tuple[Tensor, Tensor] | None, up: tuple[Tensor, Tensor] | None, rank: int, F: int
) -> tuple[Tensor, Tensor]:
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


def export_peft(
    source: str | Path,
    out_dir: str | Path,
    *,
    architecture: str | None = None,
    base_model_name_or_path: str = "",
) -> Path:
    """Write the LoRA adapter in `source` (an adapter directory, or a fine-tuned model directory
    holding adapter/) as a PEFT adapter (adapter_model.safetensors + adapter_config.json) for
    the base model exported to `architecture` (default: the one `moekit convert --to-hf`
    picks). `base_model_name_or_path` is recorded for PEFT to find the exported base."""
    from safetensors.torch import load_file, save_file

    from moekit.files import atomic_write_text
    from moekit.interop.hf import architectures, choose_architecture

    src = _adapter_source(Path(source))
    meta = read_adapter_config(src)
    if "base_config" not in meta:
        raise ValueError(
            f"{src / ADAPTER_CONFIG} does not record the base model's config (base_config); "
            "save the adapter again with this version of moekit"
        )
    cfg = ModelConfig.from_dict(meta["base_config"])
    lora = LoRAConfig.from_dict(meta["lora"])
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
    try:
        state = load_file(str(src / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{src / ADAPTER_WEIGHTS} is not a readable safetensors file ({e})") from e
    r = lora.rank
    tensors: dict[str, Tensor] = {}
    modules: list[str] = []
    parameters: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    done: set[str] = set()
    for key in sorted(state):
        owner, _, leaf = key.rpartition(".")
        if owner in done or leaf not in ("A", "B", "mask"):
            continue
        done.add(owner)
        if owner.endswith(".lora"):  # a linear layer's adapter
            name = _linear_name(owner.removesuffix(".lora"))
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = state[f"{owner}.A"]
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = state[f"{owner}.B"]
            modules.append(name)
        elif owner.endswith(".router.adapter"):
            layer = owner.split(".")[1]
            name = f"model.layers.{layer}.mlp.gate"
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = state[f"{owner}.A"]
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = state[f"{owner}.B"]
            parameters.append(f"{name}.weight")
        elif ".experts.adapters." in owner:
            continue  # collected per layer below
        else:
            raise ValueError(f"the adapter tensor {key} has no PEFT counterpart")
    for index in sorted({int(k.split(".")[1]) for k in state if ".experts.adapters." in k}):
        prefix = f"layers.{index}.ffn.experts.adapters"
        name = f"model.layers.{index}.mlp.experts"

        def factors(proj: str, prefix: str = prefix) -> tuple[Tensor, Tensor] | None:
            if f"{prefix}.{proj}.A" not in state:
                return None
            A, B = state[f"{prefix}.{proj}.A"], state[f"{prefix}.{proj}.B"]
            return A, B * state[f"{prefix}.{proj}.mask"].view(-1, 1, 1)

        gate, up, down = factors("w_gate"), factors("w_up"), factors("w_down")
        # PEFT nests one wrapper per parameter of a module, the first in parameter order
        # (gate_up_proj) innermost: its tensors sit under base_layer when down_proj also has one.
        inner = f"{name}.base_layer" if down is not None else name
        if gate is not None or up is not None:
            F = (gate or up)[1].shape[1]  # type: ignore[index]
            pa, pb = _per_expert(*_fused_gate_up(gate, up, r, F))
            tensors[f"{_PREFIX}{inner}.lora_A.weight"] = pa
            tensors[f"{_PREFIX}{inner}.lora_B.weight"] = pb
            parameters.append(f"{name}.gate_up_proj")
            rank_pattern[f"{name}.gate_up_proj"] = 2 * r
            alpha_pattern[f"{name}.gate_up_proj"] = 2 * lora.alpha
        if down is not None:
            pa, pb = _per_expert(*down)
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = pa
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = pb
            parameters.append(f"{name}.down_proj")
    if not tensors:
        raise ValueError(f"{src} holds no adapter tensors")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out / PEFT_WEIGHTS),
        metadata={"format": "pt"},
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": r,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # Exact module names (an empty list, not null: null would make PEFT pick its defaults).
        "target_modules": sorted(modules),
        "target_parameters": sorted(parameters),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    atomic_write_text(out / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    return out
