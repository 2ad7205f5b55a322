"""The arithmetic of training, apart from the run around it: the loss, one optimizer step over
accumulated micro-batches, and the validation loss. `Trainer` calls these; so can a benchmark
or a test that needs one step without a run directory."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from moekit.data.loader import IGNORE_INDEX, Batch, RoutedRows, iter_eval_batches
from moekit.model import Transformer
from moekit.moe.layer import MoEStats
from moekit.parallel.data import my_rows
from moekit.parallel.grads import clip_grad_norm
from moekit.parallel.mesh import Parallel

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast where the device runs it natively (CUDA with bf16), float32 elsewhere."""
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise ValueError(
            f"train.precision='bf16' is not supported on {device}; use 'auto' or 'fp32'"
        )
    return torch.bfloat16 if supported else None


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy, computed in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def optimizer_step(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    *,
    grad_accum: int,
    grad_clip: float,
    autocast: Autocast = contextlib.nullcontext,
    on_stats: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
    balance_routers: bool = True,
    pad_id: int | None = None,
    parallel: Parallel | None = None,
) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches of (inputs, targets).

    Loss = next-token cross-entropy over every target of the step (targets of -100 are not
    targets; each micro-batch weighs by its share of the step's targets, so accumulating gives
    the loss of one large batch) + the model's weighted router losses, averaged over the
    micro-batches. With `pad_id`, input tokens equal to it are padding: they route to no expert
    and count in no routing statistic, router loss or token count. A non-finite loss or
    gradient norm skips the update (`finite=False` in the result). After a good update (and
    with `balance_routers`) the routers' aux-loss-free biases take one step from the routed
    counts summed over the micro-batches. `on_stats(layer, counts, dropped, entropy)` sees
    every MoE layer's statistics of every micro-batch. The result's `tokens` counts the input
    tokens that were not padding.

    With `parallel` (a model split by `moekit.parallel.parallelize`), each process takes its
    own rows of every micro-batch (`my_rows`: the batches are the global ones, the same on
    every process) and the step is the one the whole batch would take on one process: the
    loss weighs each process's targets by their share of the global count, the routing
    counts (bias update, statistics) and the gradient norm are global, and the result's
    figures are those of the global batch.

    A batch with a third element (`RoutedRows`) replays that recorded routing (`_forward`).
    """
    # long function: the micro-batches, their statistics and the update of one step, in order
    model.train()
    device = next(model.parameters()).device
    batches = [_to(batch, device, parallel) for batch in batches]
    targets_per_batch = [int((b[1] != IGNORE_INDEX).sum()) for b in batches]
    all_targets = max(_total(sum(targets_per_batch), parallel), 1)
    world = parallel.world if parallel is not None else 1
    counts: dict[int, Tensor] = {}
    loss_sum = aux_sum = 0.0
    tokens = 0
    levels: list[tuple[float, float]] = []  # hierarchical routing: balance loss per level
    for batch, n in zip(batches, targets_per_batch, strict=True):
        inputs, targets = batch[0], batch[1]
        mask = inputs != pad_id if pad_id is not None else None
        tokens += int(mask.sum()) if mask is not None else inputs.numel()
        out = _forward(model, batch, mask, autocast)
        loss = lm_loss(out.logits, targets) if n else out.logits.sum() * 0.0
        share = n / all_targets
        # Data parallelism averages the processes' gradients: `world` undoes the average.
        (loss * share * world + out.aux_loss / grad_accum).backward()
        loss_sum += float(loss.detach()) * share
        aux_sum += float(out.aux_loss.detach()) / world
        levels.extend(_level_losses(out.moe_stats))
        for layer, (routed, dropped, entropy) in _layer_stats(out.moe_stats, parallel).items():
            counts[layer] = counts[layer] + routed if layer in counts else routed
            if on_stats is not None:
                on_stats(layer, routed, dropped, entropy)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    if parallel is None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    else:
        grad_norm = clip_grad_norm(model, max_norm, parallel)
        loss_sum, aux_sum, tokens = _sums((loss_sum, aux_sum, tokens), parallel)
    lr = optimizer.param_groups[0]["lr"]
    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        if balance_routers:
            model.update_router_biases(counts)
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss_sum,
        "tokens": tokens,
        "aux_loss": aux_sum / grad_accum,
        "grad_norm": grad_norm,
        "lr": lr,
        "finite": finite,
        **_balance_record(levels, parallel),
    }


def _balance_record(levels: list[tuple[float, float]], parallel: Parallel | None) -> dict:
    """{"balance_loss": {"expert": .., "group": ..}}, the mean over the step's hierarchical
    MoE layers and micro-batches (global with `parallel`); {} without such layers."""
    if not levels:
        return {}
    expert, group = (sum(v) / len(levels) for v in zip(*levels, strict=True))
    if parallel is not None:
        expert, group = (v / parallel.world for v in _sums((expert, group), parallel))
    return {"balance_loss": {"expert": expert, "group": group}}


def _level_losses(stats: dict[int, MoEStats]) -> list[tuple[float, float]]:
    """(expert-level, group-level) unweighted balance loss of each hierarchical MoE layer."""
    return [
        (float(s.aux_loss.detach()), float(s.group_aux_loss.detach()))
        for s in stats.values()
        if s.group_aux_loss is not None
    ]


def _forward(model: Transformer, batch: Batch, mask: Tensor | None, autocast: Autocast) -> Any:
    """The batch's forward pass. A batch with a recorded routing replays it: each token goes
    to the recorded experts (`Transformer.forward`'s `routed_experts`), dropless as generation
    routes (causal routing), so the loss is that of the tokens as they were sampled."""
    replay: dict[str, Any] = {}
    if len(batch) == 3:
        replay = {"causal_routing": True, **batch[2].model_args()}
    with autocast():
        return model(batch[0], token_mask=mask, **replay)


def _to(batch: Batch, device: torch.device, parallel: Parallel | None) -> Batch:
    """A batch on `device`: this process's rows of it, with `parallel`."""

    def mine(t: Tensor) -> Tensor:
        t = t.to(device)
        return my_rows(t, parallel) if parallel is not None else t

    if len(batch) == 2:
        return mine(batch[0]), mine(batch[1])
    return mine(batch[0]), mine(batch[1]), RoutedRows(*(mine(t) for t in batch[2]))


def _total(n: int, parallel: Parallel | None) -> int:
    if parallel is None:
        return n
    return int(_sums((n,), parallel)[0])


def _sums(values: tuple[float, ...], parallel: Parallel) -> tuple[Any, ...]:
    """Each value summed over the processes (ints stay ints)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=parallel.world_group)
    return tuple(type(v)(x) for v, x in zip(values, t.tolist(), strict=True))


def _layer_stats(
    stats: dict[int, MoEStats], parallel: Parallel | None
) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """Per MoE layer: routed copies per expert, dropped copies and mean routing entropy, of
    the global batch with `parallel` (one all-reduce for every layer)."""
    out = {i: (s.tokens_per_expert, s.dropped, s.entropy) for i, s in stats.items()}
    if parallel is None or not out:
        return out
    layers = sorted(out)
    flat = torch.cat(
        [torch.cat([out[i][0].double(), out[i][1].double().view(1), out[i][2].double().view(1)])
         for i in layers]
    )  # fmt: skip
    dist.all_reduce(flat, group=parallel.world_group)
    result, at = {}, 0
    for i in layers:
        n = out[i][0].numel()
        routed, dropped, entropy = flat[at : at + n], flat[at + n], flat[at + n + 1]
        result[i] = (routed.long(), dropped.long(), (entropy / parallel.world).float())
        at += n + 2
    return result


@torch.no_grad()
def eval_loss(
    model: Transformer,
    rows: Tensor,
    mask: Tensor | None = None,
    *,
    batch_size: int,
    max_batches: int,
    autocast: Autocast = contextlib.nullcontext,
) -> float:
    """Mean next-token loss over the targets of (at most `max_batches` batches of) `rows`,
    with causal routing (so expert-choice models route as they generate); NaN when the rows
    hold no target. The caller puts the model in eval mode."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, (inputs, targets) in enumerate(iter_eval_batches(rows, batch_size, mask)):
        if i >= max_batches:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast():
            logits = model(inputs, causal_routing=True).logits
        n = int((targets != IGNORE_INDEX).sum())
        if n:
            total += float(lm_loss(logits, targets)) * n
            count += n
    return total / count if count else math.nan
