"""The dense feed-forward block: SwiGLU (silu(x W_gate^T) * x W_up^T) or a GELU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.nn.fuse import Fused, plain


class MLP(nn.Module):
    w_gate: nn.Linear | None

    def __init__(self, dim: int, hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = activation
        self.w_gate = nn.Linear(dim, hidden, bias=False) if activation == "swiglu" else None
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
            return self.w_down(F.silu(gate) * up)
        up = self.w_up(x)
        h = F.silu(self.w_gate(x)) * up if self.w_gate is not None else F.gelu(up)
        return self.w_down(h)

    def init_weights(
        self, std: float, out_std: float, generator: torch.Generator | None = None
    ) -> None:
        for lin in (self.w_gate, self.w_up):
            if lin is not None:
                nn.init.normal_(lin.weight, mean=0.0, std=std, generator=generator)
        nn.init.normal_(self.w_down.weight, mean=0.0, std=out_std, generator=generator)
