"""Sizing a data-parallel x expert-parallel split of N devices from a config alone: memory per
device (weights, gradients, optimizer state, activations), the bytes each device sends per
training step, and the split to use. No model is built and torch is not imported; every
figure is an estimate from the shapes in a `ModelConfig`, under these assumptions:

- Layout. A split is DP x EP = N. The routed experts of every MoE layer are split over the EP
  group (E / EP experts per device); everything else (embeddings, attention, norms, routers,
  shared experts, dense MLPs, the LM head) is the same on every device. Each of the N devices
  reads its own tokens.
- Sharding "fsdp" (FSDP2, the default): the non-expert parameters, their gradients and their
  optimizer state are sharded over all N devices; the expert parameters, already split over
  EP, are sharded over the DP group. At rest a device keeps 1/N of every parameter. While a
  unit runs (a block, or the embeddings with the LM head) its parameters are gathered whole:
  FSDP2 prefetches the next unit, so the two largest units count in full in "weights", and one
  unit's whole gradients count in "gradients" before they are reduce-scattered. A part
  sharded over a group of one device (the experts when DP = 1) is used in place.
  Sharding "ddp": every device holds the non-expert parameters whole and its E / EP experts
  per MoE layer, with their gradients and optimizer state.
- Precision. Parameters and gradients in `param_dtype` / `grad_dtype` (bf16 by default, or
  fp32). AdamW keeps two fp32 moments (8 bytes per parameter) and, when parameters are bf16
  and `master_weights` is on, an fp32 master copy (4 more): 12 bytes per parameter.
- Activations: what autograd keeps for the backward pass, in `param_dtype`, for the
  `tokens_per_step` tokens one device processes in one forward and backward pass (one
  micro-batch). Per token and layer: the inputs of the two norms (2 D) and of the attention
  and FFN projections (2 D); the attention's queries, keys, values and output (attention is
  assumed fused, as PyTorch's SDPA kernels are: no sequence x sequence scores are kept, so
  activations grow with tokens, not with sequence length); an FFN's hidden activations (3 F
  for SwiGLU: gate, up and their product; 2 F otherwise); in an MoE layer the router's fp32
  probabilities (E x 4 bytes), and for each of the top-k copies of the token its dispatched
  input (D), its hidden activations and its expert output before the weighted combine (D),
  plus the shared experts' hidden activations. Once per token: the fp32 logits for the loss
  (vocab x 4 bytes). Routing is assumed balanced: a device's experts receive as many token
  copies as its tokens send out. With `activation_checkpointing` (whole blocks recomputed in
  the backward pass) only each block's input (D per token and layer) is kept, plus one
  block's full activations while it is recomputed.
- Communication, in bytes each device sends per step (one forward and backward pass):
  all-to-all: tokens x top-k x D x bytes per element, twice per MoE layer (dispatch and
  combine) in the forward pass and twice again in the backward pass (three times with
  activation checkpointing: the recomputation repeats the forward exchanges); only the
  fraction (EP - 1) / EP that leaves the device counts. Parameter collectives (ring
  algorithms, a group of g devices sends (g - 1) / g of the data): "fsdp" all-gathers the
  parameters in the forward pass and again in the backward pass and reduce-scatters the
  gradients (non-expert ones over N devices, expert ones over DP); "ddp" all-reduces the
  gradients (twice (g - 1) / g).

Left out: framework and communication buffers, allocator fragmentation, kernels' temporary
memory, pipeline and tensor parallelism, node boundaries and link speeds (the all-to-all of a
split whose EP group spans machines crosses the slower network).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moekit.config import ModelConfig
from moekit.files import format_bytes, parse_size
from moekit.params import attention_params, count_params, mlp_params
from moekit.validate import check_choice

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
SHARDING = ("fsdp", "ddp")
DEFAULT_GPU_MEMORY = 80 * 2**30
# The default sequence: the model's max_seq_len, but no longer than a usual pretraining one.
DEFAULT_SEQ_LEN_CAP = 4096
ADAM_MOMENT_BYTES = 8  # two fp32 moments
MASTER_BYTES = 4  # the fp32 master copy of a bf16 parameter

ASSUMPTIONS = (
    "estimates from the config alone; they leave out framework and communication buffers, "
    "allocator fragmentation, kernels' temporary memory, pipeline and tensor parallelism, "
    "and node boundaries (an EP group that spans machines sends its all-to-all over the "
    "slower network)"
)


@dataclass(frozen=True)
class SplitEstimate:
    """One DP x EP split: bytes per device (weights, gradients, optimizer state,
    activations, their total), whether the total fits, and the bytes each device sends per
    step (`all_to_all_bytes`, `collective_bytes` for the parameter collectives)."""

    dp: int
    ep: int
    experts_per_device: int  # routed experts of each MoE layer on one device
    weights: int
    gradients: int
    optimizer: int
    activations: int
    total: int
    fits: bool
    all_to_all_bytes: int
    collective_bytes: int

    @property
    def comm_bytes(self) -> int:
        return self.all_to_all_bytes + self.collective_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "comm_bytes": self.comm_bytes}


@dataclass(frozen=True)
class ParallelPlan:
    """Every DP x EP split of `gpus` devices with its estimate, and the one to use
    (`recommended`, an index into `splits`; `best`, that split) with the `reason` in words.
    In `to_dict()`, "recommended" is the split itself and "recommended_index" its index."""

    gpus: int
    gpu_memory: int
    tokens_per_step: int  # per device, one forward and backward pass
    seq_len: int
    param_dtype: str
    grad_dtype: str
    master_weights: bool
    sharding: str
    activation_checkpointing: bool
    params: int
    expert_params: int
    moe_layers: int
    splits: list[SplitEstimate]
    recommended: int
    reason: str
    assumptions: str = ASSUMPTIONS
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> SplitEstimate:
        return self.splits[self.recommended]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["splits"] = [s.to_dict() for s in self.splits]
        data["recommended_index"] = self.recommended
        data["recommended"] = self.best.to_dict()
        return data


@dataclass(frozen=True)
class _Shapes:
    """What the estimate reads from a config: parameter counts of the FSDP units and the
    activation elements of each layer."""

    params: int
    expert_params: int
    units: list[tuple[int, int]]  # (non-expert params, routed-expert params) per FSDP unit
    moe_layers: int
    copies: float  # routed copies of one token (top-k, or the capacity factor)
    layer_acts: list[tuple[int, int]]  # per layer: (elements per token, fp32 bytes per token)


def plan_parallel(
    cfg: ModelConfig,
    *,
    gpus: int,
    gpu_memory: int | str = DEFAULT_GPU_MEMORY,
    tokens_per_step: int | None = None,
    seq_len: int | None = None,
    param_dtype: str = "bf16",
    grad_dtype: str = "bf16",
    master_weights: bool = True,
    sharding: str = "fsdp",
    activation_checkpointing: bool = False,
    ep: int | None = None,
) -> ParallelPlan:
    """Memory per device and bytes sent per training step for every data-parallel x
    expert-parallel split of `gpus` devices, estimated from the config alone, and the split
    to use: of those that fit in `gpu_memory`, the one that sends the fewest bytes
    (all-to-all plus parameter collectives), else the one that needs the least memory. What
    the estimate assumes and leaves out: docs/scaling.md.

    `gpu_memory`: bytes, or a size such as "80GiB". `tokens_per_step`: the tokens one device
    processes per forward and backward pass (default: one sequence of `seq_len`, itself by
    default the model's max_seq_len capped at 4096). The expert-parallel sizes are the
    divisors of both `gpus` and the number of routed experts (only 1 for a model without MoE
    layers; only `ep` when given). Bad input is a ValueError naming the argument."""
    memory = parse_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    seq = seq_len if seq_len is not None else min(cfg.max_seq_len, DEFAULT_SEQ_LEN_CAP)
    tokens = tokens_per_step if tokens_per_step is not None else seq
    _check_inputs(gpus=gpus, gpu_memory=memory, tokens_per_step=tokens, seq_len=seq)
    check_choice("plan", "param_dtype", param_dtype, tuple(DTYPE_BYTES))
    check_choice("plan", "grad_dtype", grad_dtype, tuple(DTYPE_BYTES))
    check_choice("plan", "sharding", sharding, SHARDING)
    shapes = _shapes(cfg)
    sizes = _ep_sizes(cfg, gpus, shapes.moe_layers, ep)
    precision = _Precision(
        param=DTYPE_BYTES[param_dtype],
        grad=DTYPE_BYTES[grad_dtype],
        optimizer=ADAM_MOMENT_BYTES
        + (MASTER_BYTES if master_weights and param_dtype != "fp32" else 0),
    )
    splits = [
        _estimate(cfg, shapes, precision, gpus=gpus, ep=e, memory=memory, tokens=tokens,
                  sharding=sharding, checkpointing=activation_checkpointing)
        for e in sizes
    ]  # fmt: skip
    best, reason = _recommend(
        splits, memory, sharding=sharding, checkpointing=activation_checkpointing
    )
    notes = []
    if seq > cfg.max_seq_len:
        notes.append(f"seq_len={seq} is longer than the model's max_seq_len={cfg.max_seq_len}")
    if param_dtype == "fp32" and master_weights:
        notes.append("fp32 parameters need no master copy: the optimizer keeps the moments only")
    return ParallelPlan(
        gpus=gpus,
        gpu_memory=memory,
        tokens_per_step=tokens,
        seq_len=seq,
        param_dtype=param_dtype,
        grad_dtype=grad_dtype,
        master_weights=master_weights and param_dtype != "fp32",
        sharding=sharding,
        activation_checkpointing=activation_checkpointing,
        params=shapes.params,
        expert_params=shapes.expert_params,
        moe_layers=shapes.moe_layers,
        splits=splits,
        recommended=best,
        reason=reason,
        notes=notes,
    )


def _check_inputs(*, gpus: int, gpu_memory: int, tokens_per_step: int, seq_len: int) -> None:
    checks = (
        ("gpus", gpus, "the number of devices"),
        ("gpu_memory", gpu_memory, "the bytes of memory of one device"),
        ("seq_len", seq_len, "the tokens of one sequence"),
        ("tokens_per_step", tokens_per_step, "the tokens one device processes per step"),
    )
    for name, value, meaning in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1 ({meaning})")


def _ep_sizes(cfg: ModelConfig, gpus: int, moe_layers: int, ep: int | None) -> list[int]:
    """The expert-parallel sizes to estimate: divisors of both `gpus` and the expert count."""
    experts = cfg.moe.num_experts if cfg.moe is not None and moe_layers else 1
    sizes = [e for e in range(1, experts + 1) if experts % e == 0 and gpus % e == 0]
    if ep is None:
        return sizes
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ValueError(f"ep={ep!r} is invalid: must be an integer >= 1")
    if ep > 1 and not moe_layers:
        raise ValueError(f"ep={ep} is invalid: the model has no MoE layers, so ep must be 1")
    if gpus % ep or experts % ep:
        raise ValueError(
            f"ep={ep} is invalid: it must divide both the {gpus} devices and the {experts} "
            f"routed experts; valid: {', '.join(map(str, sizes))}"
        )
    return [ep]


def _shapes(cfg: ModelConfig) -> _Shapes:
    d, moe = cfg.dim, cfg.moe
    units = [(cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d, 0)]  # embeddings, head
    acts = []
    for layer in range(cfg.num_layers):
        other = attention_params(cfg) + 2 * d
        if moe is None or not moe.is_moe_layer(layer):
            units.append((other + mlp_params(cfg, cfg.dense_hidden), 0))
            acts.append((_block_elements(cfg) + _hidden_elements(cfg, cfg.dense_hidden), 0))
            continue
        shared = 0
        if moe.num_shared_experts:
            shared = mlp_params(cfg, moe.shared_hidden_total) + (d if moe.shared_expert_gate else 0)
        if moe.router == "hierarchical":  # the group router
            shared += moe.router_groups * d
        router = moe.num_experts * (d + 1 if moe.router_bias else d)
        units.append((other + router + shared, moe.num_experts * _expert_params(cfg)))
        routed = _copies(cfg) * (2 * d + _hidden_elements(cfg, moe.expert_hidden))
        elements = _block_elements(cfg) + round(routed)
        if moe.num_shared_experts:
            elements += _hidden_elements(cfg, moe.shared_hidden_total)
        acts.append((elements, 4 * moe.num_experts))
    counted = count_params(cfg)
    expert_params = counted.total_by["routed_experts"]
    # The units partition the model: the same total as the accounting in moekit.params.
    assert sum(o + e for o, e in units) == counted.total, "FSDP units miss parameters"
    assert sum(e for _, e in units) == expert_params
    return _Shapes(
        params=counted.total,
        expert_params=expert_params,
        units=units,
        moe_layers=len(cfg.moe_layers),
        copies=_copies(cfg),
        layer_acts=acts,
    )


def _expert_params(cfg: ModelConfig) -> int:
    moe = cfg.moe
    assert moe is not None
    biases = (2 if cfg.gated else 1) * moe.expert_hidden + cfg.dim if moe.expert_bias else 0
    return mlp_params(cfg, moe.expert_hidden) + biases


def _copies(cfg: ModelConfig) -> float:
    """How many experts one token is sent to on average."""
    moe = cfg.moe
    if moe is None:
        return 0.0
    if moe.router == "expert_choice":
        assert moe.capacity_factor is not None  # validated by MoEConfig
        return moe.capacity_factor
    return float(moe.top_k)


def _hidden_elements(cfg: ModelConfig, hidden: int) -> int:
    """Elements an MLP of `hidden` keeps per token beyond its input: gate, up and their
    product for SwiGLU; the pre-activation and the activation otherwise."""
    return (3 if cfg.gated else 2) * hidden


def _block_elements(cfg: ModelConfig) -> int:
    """Elements a block keeps per token outside its FFN's hidden layer: the two norm inputs
    and the two projection inputs (4 D), and attention's queries, keys, values and output."""
    a, h = cfg.attention, cfg.num_heads
    if a.kind == "mla":
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        latents = (a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_rope_head_dim
        attention = latents + 2 * h * qk + 2 * h * a.v_head_dim
    else:
        attention = (2 * h + 2 * cfg.kv_heads) * cfg.head_dim
    return 4 * cfg.dim + attention


@dataclass(frozen=True)
class _Precision:
    param: int  # bytes per parameter (and per activation element)
    grad: int
    optimizer: int


def _estimate(
    cfg: ModelConfig,
    shapes: _Shapes,
    precision: _Precision,
    *,
    gpus: int,
    ep: int,
    memory: int,
    tokens: int,
    sharding: str,
    checkpointing: bool,
) -> SplitEstimate:
    """The estimate of one split (DP = gpus / EP); see the module docstring."""
    dp = gpus // ep
    other = shapes.params - shapes.expert_params
    held = other + shapes.expert_params // ep  # parameters a device uses, before FSDP sharding
    if sharding == "fsdp":
        shard = _ceil_div(other, gpus) + _ceil_div(shapes.expert_params, gpus)
        # A part sharded over a group of one device is used in place, never gathered.
        gathered = sorted(
            ((o if gpus > 1 else 0) + (e // ep if dp > 1 else 0) for o, e in shapes.units),
            reverse=True,
        )
        weights = (shard + sum(gathered[:2])) * precision.param
        gradients = (shard + gathered[0]) * precision.grad
        optimizer = shard * precision.optimizer
        per_param = 2 * precision.param + precision.grad  # two all-gathers, one reduce-scatter
    else:
        weights = held * precision.param
        gradients = held * precision.grad
        optimizer = held * precision.optimizer
        per_param = 2 * precision.grad  # one all-reduce
    collective = round(
        other * per_param * (gpus - 1) / gpus
        + shapes.expert_params / ep * per_param * (dp - 1) / dp
    )
    activations = _activation_bytes(cfg, shapes, precision.param, tokens, checkpointing)
    passes = 3 if checkpointing else 2
    all_to_all = round(
        tokens * shapes.copies * cfg.dim * precision.param * 2 * passes * shapes.moe_layers
        * (ep - 1) / ep
    )  # fmt: skip
    total = weights + gradients + optimizer + activations
    return SplitEstimate(
        dp=dp,
        ep=ep,
        experts_per_device=cfg.moe.num_experts // ep if cfg.moe and shapes.moe_layers else 0,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        total=total,
        fits=total <= memory,
        all_to_all_bytes=all_to_all,
        collective_bytes=collective,
    )


def _activation_bytes(
    cfg: ModelConfig, shapes: _Shapes, element: int, tokens: int, checkpointing: bool
) -> int:
    per_layer = [n * element + fp32 for n, fp32 in shapes.layer_acts]
    logits = 4 * cfg.vocab_size
    if checkpointing:
        kept = cfg.num_layers * cfg.dim * element + max(per_layer, default=0)
    else:
        kept = sum(per_layer)
    return tokens * (kept + logits)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _gib(n: int) -> str:
    """Memory the way devices are sold: GiB (MiB, KiB below one)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _recommend(
    splits: list[SplitEstimate], memory: int, *, sharding: str, checkpointing: bool
) -> tuple[int, str]:
    """The index of the split to use and why, in words."""
    fitting = [i for i, s in enumerate(splits) if s.fits]
    if not fitting:
        best = min(range(len(splits)), key=lambda i: (splits[i].total, splits[i].comm_bytes))
        s = splits[best]
        remedies = ["shard with fsdp"] if sharding == "ddp" else []
        if not checkpointing:
            remedies.append("turn on activation checkpointing")
        if s.activations * 4 >= s.total:
            remedies.append("process fewer tokens per step")
        remedies.append("use more or larger devices")
        return best, (
            f"no split fits in {_gib(memory)} per device; DP={s.dp} x EP={s.ep} needs "
            f"the least, {_gib(s.total)}: {', '.join(remedies[:-1])}"
            + (" or " if len(remedies) > 1 else "")
            + remedies[-1]
        )
    best = min(fitting, key=lambda i: (splits[i].comm_bytes, splits[i].total))
    s = splits[best]
    why = (
        f"DP={s.dp} x EP={s.ep} fits ({_gib(s.total)} of {_gib(memory)} per "
        f"device) and sends the fewest bytes per step of the {len(fitting)} split(s) that fit: "
        f"{format_bytes(s.comm_bytes)} (all-to-all {format_bytes(s.all_to_all_bytes)}, "
        f"parameter collectives {format_bytes(s.collective_bytes)})"
    )
    if len(splits) > 1:
        why += (
            "; a larger EP sends more of each token's copies to other devices, a smaller one "
            "gathers and reduces more expert parameters over the data-parallel group"
        )
    return best, why
