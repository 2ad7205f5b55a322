"""The MoE feed-forward layer: router -> dispatch -> experts -> combine, plus shared experts.

Shape legend: B sequences, S positions, T = B * S tokens, D model dim, E experts,
K expert slots per token, S' kept copies (written `_C` in names below: copies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.moe import dispatch, losses
from moekit.moe.experts import Experts, select_backend
from moekit.moe.router import HierarchicalRouter, RouterOutput, build_router
from moekit.nn.mlp import MLP, Activation


@dataclass(frozen=True)
class RouteOptions:
    """Per-call routing options (defaults: the config's behaviour).

    causal: route as generation must, each token's output depending on that token alone:
        a router that can see other tokens (expert choice) runs its causal mode, and token
        choice is dropless whatever `capacity_factor` says (capacity is a training-time
        device: it would make an output depend on the rest of the batch and on how the
        sequence is split into forward calls). `Transformer(causal_routing=True)` sets it.
    top_k: experts per token for this call instead of the config's (token choice, and
        expert choice in causal mode): fewer for speed, more for quality.
    experts: (T, K) expert ids (-1: an empty slot) that replace the router's choice, weighted
        from the router's own scores (`Router.forward`); `rows` (T,) bool limits the replay
        to some tokens.
    record: return each token's experts and weights in `MoEStats.routing`.
    stats: compute the routing statistics; False (decoding) returns None instead of
        `MoEStats` unless `record` asks for the routing.
    mask: (T,) bool, the tokens that take part in routing; a False token (padding) goes to no
        expert and counts in no statistic and no router loss.
    """

    causal: bool | None = None
    top_k: int | Tensor | None = None  # an int, or one count per token (T,)
    experts: Tensor | None = None  # (T, K) a routing to replay, -1: an empty slot
    rows: Tensor | None = None  # (T,) bool, the tokens that replay `experts` (None: all)
    record: bool = False
    mask: Tensor | None = None
    stats: bool = True


DEFAULT_ROUTE = RouteOptions()


class MoEStats(NamedTuple):
    """What one MoE layer reports about one forward pass (no global state involved).

    tokens_per_expert: (E,) int64 copies the router sent to each expert (before capacity).
    dropped: () int64 copies dropped by the capacity rule.
    aux_loss: () float32 load-balancing loss, unweighted, differentiable.
    z_loss: () float32 router z-loss, unweighted, differentiable.
    entropy: () float32 mean routing entropy in nats, detached.
    group_aux_loss: () float32 group-level load-balancing loss of a hierarchical router,
        unweighted, differentiable; None for the other routers.

    The losses are computed when autograd is enabled; under `torch.no_grad()` they are 0.
    """

    tokens_per_expert: Tensor
    dropped: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    entropy: Tensor
    routing: RouterOutput | None = None  # each token's experts and weights, when recorded
    group_aux_loss: Tensor | None = None  # hierarchical routing only


class MoELayer(nn.Module):
    shared: MLP | None
    shared_gate: nn.Linear | None
    # Maps one batch's copy counts per expert to the counts the load-balancing loss takes its
    # fractions from; data parallelism (moekit.parallel) sums them over every process.
    reduce_counts: Callable[[Tensor], Tensor] | None = None

    def __init__(self, dim: int, cfg: MoEConfig, activation: str | Activation = "swiglu") -> None:
        super().__init__()
        self.cfg = cfg
        self.router = build_router(dim, cfg)
        self.experts = Experts(
            cfg.num_experts, dim, cfg.expert_hidden, activation, bias=cfg.expert_bias
        )
        self.shared = (
            MLP(dim, cfg.shared_hidden_total, activation) if cfg.num_shared_experts else None
        )
        self.shared_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        select_backend(cfg.backend, 0, cfg.num_experts, torch.device("cpu"))  # a known name?
        self.backend = cfg.backend

    def forward(
        self, x_BSD: Tensor, *, route: RouteOptions = DEFAULT_ROUTE
    ) -> tuple[Tensor, MoEStats | None]:
        """Returns the layer output (B, S, D) and its `MoEStats` (None when `route.stats`
        is off and nothing is recorded; see `RouteOptions`)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        decision = self.router(
            x_TD, causal=route.causal, top_k=route.top_k, experts=route.experts, rows=route.rows
        )
        if route.mask is not None:
            keep_T1 = route.mask.view(-1, 1)
            decision = decision._replace(
                experts=decision.experts.masked_fill(~keep_T1, -1),
                weights=decision.weights.masked_fill(~keep_T1, 0.0),
            )
        T, K = decision.experts.shape
        if T == 0:
            return x_BSD.new_zeros(B, S, D), self._empty_stats(decision)
        if self._decodes(T * K, route):
            out_TD = self._with_shared(
                x_TD, self.experts.decode(x_TD, decision.experts, decision.weights)
            )
            if not (route.stats or route.record):
                return out_TD.view(B, S, D), None
            valid_C = decision.experts.reshape(-1)
            routed_E = torch.bincount(valid_C[valid_C >= 0], minlength=self.cfg.num_experts)
            stats = self._stats(decision, routed_E, routed_E.new_zeros(()), route.mask)
            return out_TD.view(B, S, D), stats._replace(routing=decision if route.record else None)

        backend = self.experts.backend_for(self.backend, T * K, self.cfg.num_experts, x_BSD.device)
        p = dispatch.plan(
            decision.experts,
            decision.weights,
            self.cfg.num_experts,
            capacity=self._capacity(B, S, causal=route.causal is True),
            priority=self.cfg.capacity_priority,
            seq_len=S,
            sort=backend.needs_sorted,
        )
        x_CD, scale_C = dispatch.permute(x_TD, p), p.weight_S
        if self.cfg.scale_expert_input:  # weighted inputs, unweighted outputs (Llama 4)
            x_CD, scale_C = x_CD * scale_C.to(x_CD.dtype)[:, None], torch.ones_like(scale_C)
        y_CD = self.experts.compute(backend, x_CD, p.expert_S, p.tokens_per_expert, scale_C)
        out_TD = self._with_shared(x_TD, dispatch.combine(y_CD, p, T))
        if not (route.stats or route.record):
            return out_TD.view(B, S, D), None
        stats = self._stats(decision, p.routed_per_expert, p.num_dropped, route.mask)
        if route.record:
            stats = stats._replace(routing=decision)
        return out_TD.view(B, S, D), stats

    def _decodes(self, copies: int, route: RouteOptions) -> bool:
        """Whether this call takes the decode path (`decode_experts`): inference routing of a
        decode-sized batch (no more copies than experts) with the automatic backend, no
        autograd, and experts that can (`Experts.can_decode`: no adapters)."""
        return (
            route.causal is True
            and copies <= self.cfg.num_experts
            and self.backend == "auto"
            and not torch.is_grad_enabled()
            and self.experts.can_decode()
            and not self.cfg.scale_expert_input  # the decode kernels weight outputs
        )

    def _with_shared(self, x_TD: Tensor, out_TD: Tensor) -> Tensor:
        """The routed output plus the shared experts' (gated when configured)."""
        if self.shared is None:
            return out_TD
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
        return out_TD + shared_TD

    def _capacity(self, batch: int, seq_len: int, *, causal: bool) -> int | None:
        """Copies per expert: per batch with weight priority, per sequence with position;
        None (dropless) when routing causally. A capacity counts the tokens of one forward
        call, so with it a token's output would change with the batch it shares (padding and
        other users' rows) and with how its sequence is cut into calls (prefill, then one
        token at a time): causal routing must not depend on either."""
        if causal or self.cfg.router == "expert_choice":  # expert choice fills its own
            return None
        if self.cfg.capacity_priority == "position":
            return self.cfg.capacity(seq_len)
        return self.cfg.capacity(batch * seq_len)

    def _stats(
        self, route: RouterOutput, routed_E: Tensor, dropped: Tensor, mask_T: Tensor | None
    ) -> MoEStats:
        logits_TE, experts_TK = route.logits, route.experts
        if mask_T is not None:  # padding counts in no statistic and no loss
            logits_TE, experts_TK = logits_TE[mask_T], experts_TK[mask_T]
        probs_TE = self.router.probs(logits_TE)
        if not len(probs_TE):
            zero = route.logits.new_zeros(()) + 0.0 * route.logits.sum()
            if self.reduce_counts is not None and torch.is_grad_enabled():
                self.reduce_counts(routed_E.float())  # in step with the other processes
            return MoEStats(routed_E, dropped, zero, zero, zero.detach(), None, self._group(zero))
        entropy = losses.router_entropy(probs_TE.detach())
        # The router losses only matter for training: without autograd (evaluation, decoding)
        # they are reported as 0 and cost nothing.
        group = None
        if torch.is_grad_enabled():
            aux = losses.load_balancing_loss(probs_TE, experts_TK, self.reduce_counts)
            z = losses.z_loss(logits_TE)
            if isinstance(self.router, HierarchicalRouter):
                group = losses.group_balance_loss(
                    probs_TE, experts_TK, self.router.groups, self.reduce_counts
                )
        else:
            aux = z = route.logits.new_zeros(())
            if isinstance(self.router, HierarchicalRouter):
                group = aux
        return MoEStats(routed_E, dropped, aux, z, entropy, group_aux_loss=group)

    def _empty_stats(self, route: RouterOutput) -> MoEStats:
        zero = route.logits.new_zeros(()) + 0.0 * route.logits.sum()  # keeps the graph alive
        counts = torch.zeros(self.cfg.num_experts, dtype=torch.long, device=zero.device)
        return MoEStats(counts, counts.sum(), zero, zero, zero.detach(), None, self._group(zero))

    def _group(self, zero: Tensor) -> Tensor | None:
        """The group-level loss of an empty batch: 0 for a hierarchical router, else None."""
        return zero if isinstance(self.router, HierarchicalRouter) else None

    def weighted_loss(self, stats: MoEStats) -> Tensor:
        """The layer's contribution to the training loss: its aux and z losses, weighted."""
        loss = self.cfg.aux_loss_weight * stats.aux_loss + self.cfg.z_loss_weight * stats.z_loss
        if stats.group_aux_loss is not None:
            loss = loss + self.cfg.group_aux_loss_weight * stats.group_aux_loss
        return loss

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Apply one aux-loss-free bias step from the step's routed counts (no-op without bias)."""
        if isinstance(self.router, HierarchicalRouter):
            self.router.update_biases(tokens_per_expert_E)
        elif self.router.selection_bias is not None:
            losses.update_selection_bias(
                self.router.selection_bias, tokens_per_expert_E, self.cfg.bias_update_rate
            )

    def init_weights(
        self, std: float, out_std: float, generator: torch.Generator | None = None
    ) -> None:
        self.router.init_weights(std, generator)
        self.experts.init_weights(std, out_std, generator)
        if self.shared is not None:
            self.shared.init_weights(std, out_std, generator)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, mean=0.0, std=std, generator=generator)
