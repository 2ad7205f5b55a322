"""How much each expert matters, measured on calibration text: what pruning and splitting
decide by.

Two criteria per MoE layer and expert e, over the tokens the layer routes to e (X_e):
- frequency: |X_e|, the copies routed to e (the plain baseline);
- reap: (1 / |X_e|) * sum over x in X_e of g_e(x) * ||f_e(x)||_2, the router-weighted norm of
  e's output (REAP, router-weighted expert activation pruning: an expert that is chosen
  rarely, with small weights, or whose output is small contributes little to the layer). An
  expert never chosen scores 0 by both.

Routing is inference routing (`causal_routing=True`), the layer input is captured by a hook
and each expert's output recomputed on its tokens (the layer's own expert code), so the cost
is about one more forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.routing import cut_rows
from moekit.model import Transformer

CRITERIA = ("reap", "frequency")


@dataclass
class ExpertImportance:
    """Per MoE layer (by index) and expert: `frequency` (E,) copies routed, `reap` (E,) the
    mean router-weighted output norm over them (see the module docstring); `tokens` measured
    and the mean next-token `loss` on them."""

    tokens: int
    frequency: dict[int, Tensor]
    reap: dict[int, Tensor]
    loss: float

    def scores(self, criterion: str) -> dict[int, Tensor]:
        """The scores `criterion` ("reap" or "frequency") ranks experts by, per layer."""
        if criterion not in CRITERIA:
            raise ValueError(
                f"criterion={criterion!r} is invalid: choose from {', '.join(CRITERIA)}"
            )
        return (
            self.reap if criterion == "reap" else {k: v.double() for k, v in self.frequency.items()}
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "loss": self.loss,
            "frequency": {str(k): v.tolist() for k, v in self.frequency.items()},
            "reap": {str(k): v.tolist() for k, v in self.reap.items()},
        }


@torch.no_grad()
def expert_importance(
    model: Transformer,
    ids: Tensor,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> ExpertImportance:
    """Measure every expert of `model` on the token ids `ids` (N,), cut into rows of `seq_len`
    run `batch_size` at a time; a ValueError for a model without MoE layers."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("the model has no MoE layers: there are no experts to measure")
    model.eval()
    device = next(model.parameters()).device
    num_experts = next(iter(layers.values())).cfg.num_experts
    freq = {i: torch.zeros(num_experts, dtype=torch.long) for i in layers}
    reap_sum = {i: torch.zeros(num_experts, dtype=torch.float64) for i in layers}
    inputs: dict[int, Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0]))
        for i, layer in layers.items()
    ]
    loss_sum, predicted, done = 0.0, 0, 0
    try:
        for batch in cut_rows(ids, min(seq_len, model.cfg.max_seq_len), batch_size):
            batch = batch.to(device)
            out = model(batch, causal_routing=True, return_routing=True)
            if batch.shape[1] > 1:
                logp = out.logits[:, :-1].float().log_softmax(-1)
                loss_sum -= float(logp.gather(-1, batch[:, 1:, None]).sum())
                predicted += batch[:, 1:].numel()
            for i, layer in layers.items():
                routing = out.moe_stats[i].routing
                assert routing is not None  # asked for with return_routing=True
                x_TD = inputs[i].reshape(-1, inputs[i].shape[-1])
                _measure(
                    layer.experts, x_TD, routing.experts, routing.weights, freq[i], reap_sum[i]
                )
            done += batch.numel()
            if progress is not None:
                progress(done, ids.numel())
    finally:
        for h in hooks:
            h.remove()
    reap = {i: reap_sum[i] / freq[i].clamp_min(1).double() for i in layers}
    return ExpertImportance(done, freq, reap, loss_sum / max(predicted, 1))


def _measure(
    experts: Any, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, freq: Tensor, reap: Tensor
) -> None:
    """Add one batch's routed copies and router-weighted output norms to `freq` and `reap`."""
    for e in torch.unique(experts_TK[experts_TK >= 0]).tolist():
        token_T, slot_T = (experts_TK == e).nonzero(as_tuple=True)
        norms = experts.expert_forward(x_TD[token_T], e).float().norm(dim=-1)
        reap[e] += float((weights_TK[token_T, slot_T].float() * norms).sum())
        freq[e] += token_T.numel()
