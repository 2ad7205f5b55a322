"""Routed experts with quantised weights, computed per expert like the float backends.

Shape legend: S kept token copies, D model dim, F expert hidden dim, E experts.

`QuantExperts` holds `w_gate` / `w_up` (float shape [E, F, D]) and `w_down` ([E, D, F]) as
`QuantWeight`s. `BACKEND` computes them over expert-sorted rows: one kernel call per
projection per non-empty expert, reading only that expert's packed slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.moe.experts import ExpertBackend, Experts
from moekit.quant.weight import QuantWeight

PROJECTIONS = ("w_gate", "w_up", "w_down")


class QuantExperts(nn.Module):
    """E feed-forward experts whose stacked weights are quantised (see `QuantWeight`)."""

    w_gate: QuantWeight | None

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str,
        bits: int,
        group: int | None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.activation, self.bits, self.group = activation, bits, group
        E, D, F_ = num_experts, dim, hidden
        gate = activation == "swiglu"
        self.w_gate = QuantWeight((E, F_, D), bits, group, device) if gate else None
        self.w_up = QuantWeight((E, F_, D), bits, group, device)
        self.w_down = QuantWeight((E, D, F_), bits, group, device)

    @classmethod
    def like(cls, ex: Experts, bits: int, group: int | None) -> QuantExperts:
        """Quantised experts of `ex`'s shapes; its weights quantised unless on the meta device."""
        if len(ex.adapters):
            raise ValueError(
                "experts with low-rank adapters cannot be quantised; merge the adapter first"
            )
        device = ex.w_up.device
        q = cls(ex.num_experts, ex.dim, ex.hidden, ex.activation, bits, group, device)
        if device.type != "meta":
            for name in PROJECTIONS:
                w = getattr(ex, name)
                if w is not None:
                    setattr(q, name, QuantWeight.from_float(w, bits, group))
        return q

    def dequantized(self) -> Experts:
        """Float experts holding this module's weights dequantised (the test oracle)."""
        ex = Experts(self.num_experts, self.dim, self.hidden, self.activation)
        with torch.no_grad():
            for name in PROJECTIONS:
                w = getattr(self, name)
                if w is not None:
                    getattr(ex, name).copy_(w.dequantize())
        return ex.to(self.w_up.parts()["qweight"].device)

    def act(self, gate: Tensor | None, up: Tensor) -> Tensor:
        return F.gelu(up) if gate is None else F.silu(gate) * up

    def compute(
        self, backend: ExpertBackend, x_SD: Tensor, expert_S: Tensor, counts_E: Tensor,
        scale_S: Tensor,
    ) -> Tensor:  # fmt: skip
        """`backend` (the quantised one the layer is given) on these experts, as the MoE
        layer calls float experts."""
        return backend.fn(x_SD, expert_S, counts_E, scale_S, self)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
            f"activation={self.activation}, bits={self.bits}"
        )


def quantized_experts(
    x_SD: Tensor, expert_S: Tensor, counts_E: Tensor, scale_S: Tensor, ex: nn.Module
) -> Tensor:
    """`scale_S * expert(x_SD)` for expert-sorted rows: per non-empty expert, its gate, up
    and down products from the packed weights (the float backends' row contract)."""
    assert isinstance(ex, QuantExperts)
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if not n:
            continue
        x = x_SD[start : start + n]
        gate = ex.w_gate.matmul(x, e) if ex.w_gate is not None else None
        h_NF = ex.act(gate, ex.w_up.matmul(x, e))
        h_NF = h_NF * scale_S[start : start + n].to(h_NF.dtype).unsqueeze(1)
        outs.append(ex.w_down.matmul(h_NF, e))
        start += n
    if not outs:
        return x_SD.new_zeros(0, ex.dim)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


BACKEND = ExpertBackend(
    "quantized",
    quantized_experts,
    needs_sorted=True,
    description="packed weights, one kernel call per projection per non-empty expert",
)
