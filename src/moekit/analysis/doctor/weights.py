"""The checks on the stored weights: experts that are copies of each other or all zeros, and
routers stored in low precision."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from moekit.analysis.doctor.check import Check, moe_layers, not_applicable
from moekit.analysis.doctor.sample import RoutingSample
from moekit.analysis.doctor.weight_files import WeightFiles

if TYPE_CHECKING:
    import torch

    from moekit.config import ModelConfig

PROJECTIONS = ("w_gate", "w_up", "w_down")
FLOAT32_NAMES = ("F32", "F64")  # safetensors dtype names precise enough for routing


def _digest(t: torch.Tensor) -> str:
    """A hash of the tensor's bytes: equal digests mean bitwise-equal experts."""
    import torch

    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def check_expert_copies(cfg: ModelConfig, weights: WeightFiles) -> Check:
    """expert_copies: an expert with an all-zero projection is a problem; experts that are
    bitwise copies of each other (all three projections) a warning."""
    name = "expert_copies"
    if cfg.moe is None:
        return not_applicable(name, "the model is dense (no MoE layer)")
    zero: dict[str, dict[int, list[str]]] = {}
    copies: dict[str, list[list[int]]] = {}
    checked = 0
    for i in moe_layers(cfg):
        stacks = {p: f"layers.{i}.ffn.experts.{p}" for p in PROJECTIONS}
        stacks = {p: n for p, n in stacks.items() if n in weights or f"{n}.qweight" in weights}
        if not stacks:
            continue
        checked += 1
        num_experts = cfg.moe.num_experts
        keys: list[list[str]] = [[] for _ in range(num_experts)]
        for proj, tensor_name in stacks.items():
            stacked = _stacked(cfg, weights, tensor_name)
            for e in range(min(num_experts, stacked.shape[0])):
                if not bool(stacked[e].any()):
                    zero.setdefault(str(i), {}).setdefault(e, []).append(proj)
                keys[e].append(_digest(stacked[e]))
        groups: dict[tuple[str, ...], list[int]] = {}
        for e, k in enumerate(keys):
            if e not in zero.get(str(i), {}):
                groups.setdefault(tuple(k), []).append(e)
        if dup := [g for g in groups.values() if len(g) > 1]:
            copies[str(i)] = dup
    if checked == 0:
        return Check(
            name,
            "problem",
            "no stacked expert weights (layers.N.ffn.experts.w_up ...) are stored for any MoE "
            "layer.",
            "The weights lack the experts entirely: convert the checkpoint again.",
            {"layers_checked": 0},
        )
    data = {
        "layers_checked": checked,
        "zero": {k: {str(e): p for e, p in v.items()} for k, v in zero.items()},
        "copies": copies,
    }
    if zero:
        evidence = (
            "experts whose weights are all zeros: "
            + "; ".join(
                f"layer {k}: " + ", ".join(f"expert {e} ({'/'.join(p)})" for e, p in v.items())
                for k, v in zero.items()
            )
            + "."
        )
        advice = (
            "An all-zero expert computes nothing: a conversion dropped it (a key-name mismatch "
            "leaves the freshly zeroed tensor in place). Convert the checkpoint again and check "
            "every expert's key maps to the source."
        )
        if copies:
            evidence += " Also identical experts: " + _copies_words(copies) + "."
        return Check(name, "problem", evidence, advice, data)
    if copies:
        evidence = "experts that are exact copies of each other: " + _copies_words(copies) + "."
        advice = (
            "Identical experts receive the same gradient from the same tokens and may never "
            "diverge: upcycling without symmetry breaking (moekit upcycle --noise 0.01) or a "
            "conversion that wrote one expert into several slots. Add noise or convert again."
        )
        return Check(name, "warning", evidence, advice, data)
    evidence = (
        f"the experts of all {checked} MoE layer(s) are pairwise distinct and none is all zeros."
    )
    return Check(name, "ok", evidence, "", data)


def _stacked(cfg: ModelConfig, weights: WeightFiles, name: str) -> torch.Tensor:
    """A stacked expert weight in float (a quantised one dequantised: moekit.quant)."""
    if name in weights or cfg.quantization is None:
        return weights.get(name)
    from moekit.quant import formats

    q = cfg.quantization
    parts = {p: weights.get(f"{name}.{p}") for p in formats.stored_parts(q.bits)}
    return formats.dequantize(parts, q.bits, q.group_size)


def _copies_words(copies: dict[str, list[list[int]]]) -> str:
    return "; ".join(
        f"layer {k}: " + ", ".join("experts " + " = ".join(map(str, g)) for g in v)
        for k, v in copies.items()
    )


def check_router_precision(
    cfg: ModelConfig, weights: WeightFiles, sample: RoutingSample | str
) -> Check:
    """router_precision: router weights or selection biases stored in less than float32, or
    router logits computed in less on the sample, are a problem."""
    name = "router_precision"
    if cfg.moe is None:
        return not_applicable(name, "the model is dense (no MoE layer)")
    router_names = [
        n
        for n in weights.dtypes
        if n.endswith((".ffn.router.weight", ".ffn.router.selection_bias"))
        # hierarchical routing's group router
        or n.endswith((".ffn.router.group_weight", ".ffn.router.group_selection_bias"))
    ]
    low = {
        n: weights.dtypes[n] for n in sorted(router_names) if weights.dtypes[n] not in FLOAT32_NAMES
    }
    logits = sorted(sample.logits_dtypes) if isinstance(sample, RoutingSample) else []
    low_logits = [d for d in logits if d not in ("float32", "float64")]
    data = {
        "router_tensors": len(router_names),
        "low_precision": low,
        "logits_dtypes": logits,
    }
    advice = (
        "Routing decides by small score differences: a bf16 router weight keeps ~3 significant "
        "digits, so top-k choices flip and small training updates round away. moekit computes "
        "routing in float32 from float32 weights; keep the router weights and selection biases "
        "float32 in the checkpoint (moekit convert and cast_model do; re-export with them in "
        "float32, or from the float32 source)."
    )
    if low or low_logits:
        parts = []
        if low:
            kinds = sorted(set(low.values()))
            shown = ", ".join(f"{n} ({d})" for n, d in list(low.items())[:4])
            parts.append(
                f"{len(low)} of {len(router_names)} router tensors are stored in "
                f"{'/'.join(kinds)}: {shown}" + (" ..." if len(low) > 4 else "")
            )
        if low_logits:
            parts.append(f"router logits were computed in {', '.join(low_logits)} on the sample")
        return Check(name, "problem", "; ".join(parts) + ".", advice, data)
    if not router_names:
        return Check(
            name,
            "problem",
            "no router weight (layers.N.ffn.router.weight) is stored.",
            "The weights lack the routers: convert the checkpoint again.",
            data,
        )
    measured = f"; router logits computed in {', '.join(logits)} on the sample" if logits else ""
    evidence = f"all {len(router_names)} router tensors are stored in float32{measured}."
    return Check(name, "ok", evidence, "", data)
