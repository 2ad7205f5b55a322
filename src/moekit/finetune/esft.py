"""Expert-specialised fine-tuning (ESFT): train only the experts the task actually uses.

First measure, per MoE layer, how much routing weight the fine-tuning data gives each routed
expert; then, per layer, keep the fewest experts whose share of that weight reaches the
coverage (e.g. 0.5) trainable and freeze everything else (optionally leaving attention
trainable). A stacked expert weight cannot be frozen in part by `requires_grad`, so the
frozen experts' gradients are masked to zero and, after every optimizer step, their weights are
put back exactly as they were (weight decay would otherwise still move them).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from moekit.data.loader import TokenizedData, iter_eval_batches
from moekit.model import Transformer
from moekit.moe.experts import Experts

SAMPLE_BATCHES = 32  # training batches measured to choose the experts


@torch.no_grad()
def routing_mass(model: Transformer, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[int, Tensor]:
    """Sum of routing weights each routed expert receives over the (valid) input tokens, per
    MoE layer. `batches` yields (input ids, valid mask) pairs."""
    was_training = model.training
    model.eval()
    mass: dict[int, Tensor] = {}
    try:
        for inputs, valid in batches:
            out = model(inputs, causal_routing=True, return_routing=True)
            keep = valid.reshape(-1)
            for layer, stats in out.moe_stats.items():
                assert stats.routing is not None
                experts = stats.routing.experts[keep]
                weights = stats.routing.weights[keep]
                chosen = experts >= 0
                total = mass.setdefault(layer, torch.zeros(model.cfg.moe.num_experts))  # type: ignore[union-attr]
                total.index_add_(0, experts[chosen].cpu(), weights[chosen].float().cpu())
    finally:
        model.train(was_training)
    return mass


def data_routing_share(
    model: Transformer, data: TokenizedData, *, batch_size: int, pad_id: int
) -> dict[int, Tensor]:
    """`routing_mass` over the first `SAMPLE_BATCHES` training batches of `data`, padding
    (`pad_id`) left out."""
    if not model.moe_layers():
        raise ValueError("finetune.method='esft' needs an MoE model")
    device = next(model.parameters()).device
    batches = (
        (inputs.to(device), (inputs != pad_id).to(device))
        for _, (inputs, _targets) in zip(
            range(SAMPLE_BATCHES),
            iter_eval_batches(data.train, batch_size, data.train_mask),
            strict=False,
        )
    )
    return routing_mass(model, batches)


def select_experts(mass: dict[int, Tensor], coverage: float) -> dict[int, list[int]]:
    """Per layer, the fewest experts (heaviest first) whose routing weight reaches `coverage`
    of the layer's total."""
    chosen = {}
    for layer, weights in sorted(mass.items()):
        order = torch.argsort(weights, descending=True, stable=True)
        share = weights[order].cumsum(0) / weights.sum().clamp_min(1e-12)
        count = int((share < coverage - 1e-9).sum()) + 1
        chosen[layer] = sorted(order[:count].tolist())
    return chosen


def trainable_params(
    model: Transformer, selection: dict[int, list[int]], *, attention: bool
) -> int:
    """Parameters that train under `selection`: the chosen experts' slices of the stacked
    weights (a stacked weight trains only in part), plus attention when it trains."""
    layers = model.moe_layers()
    count = 0
    for layer, experts in selection.items():
        ex = layers[layer].experts
        per_expert = sum(w[0].numel() for w in _stacked(ex) if w is not None)
        count += len(experts) * per_expert
    if attention:
        count += sum(p.numel() for b in model.blocks() for p in b.attn.parameters())
    return count


def _stacked(ex: Experts) -> tuple[Tensor | None, ...]:
    """Every stacked [E, ...] parameter of `ex`: the weights, and the biases where it has them."""
    return (ex.w_gate, ex.w_up, ex.w_down, ex.b_gate, ex.b_up, ex.b_down)


class ExpertFreeze:
    """Keeps every expert outside `selection` exactly as it is while the rest trains."""

    def __init__(
        self, model: Transformer, selection: dict[int, list[int]], *, attention: bool
    ) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        self._saved: list[tuple[Tensor, Tensor, Tensor]] = []  # (weight, frozen mask, copy)
        layers = model.moe_layers()
        for layer, experts in selection.items():
            ex = layers[layer].experts
            keep = torch.zeros(ex.num_experts, dtype=torch.bool)
            keep[experts] = True
            for w in _stacked(ex):
                if w is None:
                    continue
                w.requires_grad_(True)
                mask = keep.to(w.device).view(-1, *[1] * (w.dim() - 1)).to(w.dtype)
                w.register_hook(lambda g, mask=mask: g * mask)
                frozen = ~keep.to(w.device)
                self._saved.append((w, frozen, w.detach()[frozen].clone()))
        if attention:
            for block in model.blocks():
                for p in block.attn.parameters():
                    p.requires_grad_(True)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the frozen experts after every step of `optimizer`."""
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore())

    @torch.no_grad()
    def restore(self) -> None:
        for weight, frozen, saved in self._saved:
            weight[frozen] = saved
