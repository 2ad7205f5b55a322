"""The dense feed-forward block and the activations it shares with the experts: SwiGLU
(silu(x W_gate^T) * x W_up^T), gpt-oss's clamped SwiGLU, or a GELU MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import GATED_ACTIVATIONS, ModelConfig
from moekit.nn.fuse import Fused, plain


@dataclass(frozen=True)
class Activation:
    """A feed-forward activation of the gate and up projections (`ModelConfig.activation`).

    "swiglu": silu(gate) * up. "gelu": gelu(up), no gate. "clamped_swiglu" (gpt-oss): gate
    clamped to at most `limit`, up to [-limit, limit], then (up + 1) * gate *
    sigmoid(alpha * gate)."""

    kind: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def of(cls, cfg: ModelConfig) -> Activation:
        return cls(cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)

    @classmethod
    def coerce(cls, activation: str | Activation) -> Activation:
        return activation if isinstance(activation, Activation) else cls(activation)

    @property
    def gated(self) -> bool:
        return self.kind in GATED_ACTIVATIONS

    def __call__(self, gate: Tensor | None, up: Tensor) -> Tensor:
        if gate is None:
            return F.gelu(up)
        if self.kind == "swiglu":
            return F.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class MLP(nn.Module):
    w_gate: nn.Linear | None

    def __init__(self, dim: int, hidden: int, activation: str | Activation = "swiglu") -> None:
        super().__init__()
        self.act = Activation.coerce(activation)
        self.activation = self.act.kind
        self.w_gate = nn.Linear(dim, hidden, bias=False) if self.act.gated else None
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)
        self.hidden = hidden
        self._gate_up = Fused()

    def forward(self, x: Tensor) -> Tensor:
        fusable = self.w_gate is not None and plain(self.w_gate, self.w_up)
        if fusable and not torch.is_grad_enabled():
            # Inference: gate and up as one matmul over their weights fused in memory.
            assert self.w_gate is not None
            w = self._gate_up.get([self.w_gate.weight, self.w_up.weight])
            gate, up = F.linear(x, w).split(self.hidden, dim=-1)
            return self.w_down(self.act(gate, up))
        gate = self.w_gate(x) if self.w_gate is not None else None
        return self.w_down(self.act(gate, self.w_up(x)))

    def init_weights(
        self, std: float, out_std: float, generator: torch.Generator | None = None
    ) -> None:
        for lin in (self.w_gate, self.w_up):
            if lin is not None:
                nn.init.normal_(lin.weight, mean=0.0, std=std, generator=generator)
        nn.init.normal_(self.w_down.weight, mean=0.0, std=out_std, generator=generator)
