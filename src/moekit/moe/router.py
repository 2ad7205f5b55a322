"""Routers: map tokens `x_TD` to `RouterOutput(weights_TK, experts_TK, logits_TE)` in float32.

Shape legend: T tokens, D model dim, E experts, K expert slots per token, G expert groups,
C capacity (tokens per expert).

Every router computes its logits in float32 from a float32 weight, whatever the model's dtype
or autocast state: low-precision routing flips top-k choices and is a classic silent failure.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.moe.decode_kernel import library_reads


def _project(x_TD: Tensor, w_ED: Tensor, bias_E: Tensor | None = None) -> Tensor:
    """`F.linear(x_TD, w_ED, bias_E)`; for one token on the CPU under `torch.compile` (a
    compiled decode step), written as a reduction over each weight row instead (unless the
    weight is one the library reads faster, `library_reads`), which the compiler fuses with
    the softmax and top-k around it. As a product the step called the library for a (1, E)
    result and first copied its input (docs/benchmarks.md measures the difference)."""
    one_row = x_TD.shape[0] == 1 and x_TD.device.type == "cpu"
    if one_row and torch.compiler.is_compiling() and not library_reads(w_ED):
        out_TE = (w_ED * x_TD).sum(-1).view(1, -1)
        return out_TE if bias_E is None else out_TE + bias_E
    return F.linear(x_TD, w_ED, bias_E)


class RouterOutput(NamedTuple):
    """What a router decides for each token.

    weights: (T, K) float32 routing weights; 0 in empty slots.
    experts: (T, K) int64 expert ids in [0, E), or -1 for an empty slot. Token-choice routers
        fill every slot with K distinct experts; expert choice gives a token 0..E experts and
        pads the rest of its row with -1.
    logits: (T, E) float32 router logits (before any selection bias).
    """

    weights: Tensor
    experts: Tensor
    logits: Tensor


class Router(nn.Module):
    """Base router: a float32 linear map D -> E (bias-free unless `router_bias`) plus the score
    function."""

    selection_bias: Tensor | None
    bias: nn.Parameter | None

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim, dtype=torch.float32))
        # A learned bias on the logits (`router_bias`, gpt-oss): part of the scores, so it
        # moves both the choice and the weights (unlike the selection bias).
        if cfg.router_bias:
            self.bias = nn.Parameter(torch.empty(cfg.num_experts, dtype=torch.float32))
        else:
            self.register_parameter("bias", None)
        # A selection-only bias for aux-loss-free balancing; None for routers without one.
        self.register_buffer("selection_bias", None)
        # A low-rank update of the router weight (LoRA on the router), when fine-tuning.
        self.adapter: nn.Module | None = None

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        if self.training and self.cfg.router_jitter > 0:
            eps = self.cfg.router_jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        if torch.is_autocast_enabled(x_TD.device.type):
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                return self._logits(x_TD.float())
        return self._logits(x_TD.float())

    def _logits(self, x_TD: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        logits_TE = _project(x_TD, self.weight.float(), bias)
        if self.adapter is not None and not self.adapter.merged:
            logits_TE = logits_TE + self.adapter(x_TD)
        return logits_TE

    def probs(self, logits_TE: Tensor) -> Tensor:
        """Per-token scores normalised to sum to 1 (what the load-balancing loss uses)."""
        if self.cfg.score_func == "softmax":
            return logits_TE.softmax(dim=-1)
        scores = logits_TE.sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    def forward(
        self,
        x_TD: Tensor,
        *,
        causal: bool | None = None,
        top_k: int | Tensor | None = None,
        experts: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> RouterOutput:
        """Route `x_TD`. `causal=True` forces a router whose choice depends on other tokens
        (expert choice) into its causal mode; token choice is always causal and ignores it.
        `top_k` overrides the number of experts per token for this call where the router
        picks a fixed number (token choice; expert choice in causal mode): an int for every
        token, or a (T,) tensor with one count per token.

        `experts` (T, K) int, -1 for an empty slot, replays a recorded routing: these experts
        replace the router's own choice, and each is weighted as the router weights its own
        choice (from its scores at those experts; see `replay_weights`), so that replaying
        the router's own choice gives the same weights and gradients reach the router through
        them as usual. `rows` (T,) bool limits the replay to those tokens (the others route
        themselves). A bad shape is a ValueError here; the ids are the caller's to check
        (`check_replay`; the model checks every layer's at once)."""
        raise NotImplementedError

    @property
    def max_top_k(self) -> int:
        """The most experts per token this router can give (what `top_k` may ask for)."""
        return max_top_k(self.cfg)

    def check_top_k(self, top_k: int | Tensor) -> int:
        """The largest count in `top_k` if this router can give it, else ValueError."""
        limit = self.max_top_k
        if isinstance(top_k, Tensor):
            low, high = int(top_k.min()), int(top_k.max())
        elif isinstance(top_k, bool) or not isinstance(top_k, int):
            raise ValueError(f"top_k={top_k!r} is invalid: must be an integer")
        else:
            low = high = top_k
        if not 1 <= low <= high <= limit:
            shown = top_k if isinstance(top_k, int) else f"{low}..{high}"
            raise ValueError(f"top_k={shown} is invalid for this model: must be in 1..{limit}")
        return high

    def check_replay(self, experts_TK: Tensor, tokens: int, name: str = "experts") -> None:
        """ValueError unless `experts_TK` is a routing this router could replay for `tokens`
        tokens: (tokens, K) integers with 1 <= K <= `max_top_k`, each an expert id or -1 (an
        empty slot), no expert twice for one token."""
        check_replay(experts_TK, tokens, self.num_experts, self.max_top_k, name)

    def _replayed(
        self,
        scores_TE: Tensor,
        own: tuple[Tensor, Tensor] | None,
        experts_TK: Tensor,
        rows_T: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """The experts and unnormalised weights when `experts_TK` replaces the router's own
        choice `own` (None: not computed, every token replays) on the tokens of `rows_T`."""
        # The ids themselves are checked by the caller, once for every layer (the model), or
        # with `check_replay`: here only what costs no device round trip.
        check_replay_shape(experts_TK, scores_TE.shape[0], self.max_top_k, "experts")
        experts_TK = experts_TK.to(device=scores_TE.device, dtype=torch.long)
        weights_TK = replay_weights(scores_TE, experts_TK)
        if own is None or rows_T is None:
            return experts_TK, weights_TK
        own_e, own_w = own
        K = max(own_e.shape[1], experts_TK.shape[1])
        keep_T1 = rows_T.to(scores_TE.device).view(-1, 1)
        experts_TK = torch.where(keep_T1, _widen(experts_TK, K, -1), _widen(own_e, K, -1))
        weights_TK = torch.where(keep_T1, _widen(weights_TK, K, 0), _widen(own_w, K, 0))
        return experts_TK, weights_TK

    def _decide(
        self,
        logits_TE: Tensor,
        scores_TE: Tensor,
        choose: Callable[[], tuple[Tensor, Tensor]],
        experts: Tensor | None,
        rows: Tensor | None,
        normalize: bool,
    ) -> RouterOutput:
        """A token-choice decision: the router's own choice (`choose()`, experts and weights),
        replaced by `experts` on the tokens of `rows` (every token, without `rows`: then no
        choice is made), weights renormalised over the token's experts with `normalize` and
        scaled by `routed_scaling_factor`."""
        if experts is not None and rows is None:  # every token replays: no choice to make
            experts_TK, weights_TK = self._replayed(scores_TE, None, experts, None)
        else:
            experts_TK, weights_TK = choose()
            if experts is not None:
                own = (experts_TK, weights_TK)
                experts_TK, weights_TK = self._replayed(scores_TE, own, experts, rows)
        if normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * self.cfg.routed_scaling_factor
        return RouterOutput(weights_TK, experts_TK, logits_TE)

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std, generator=generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.selection_bias is not None:
            self.selection_bias.zero_()


def max_top_k(cfg: MoEConfig) -> int:
    """The most experts per token the router `cfg` describes can give."""
    if cfg.router == "switch":
        return 1
    if cfg.router == "hierarchical":
        return cfg.group_top_k * (cfg.num_experts // cfg.router_groups)
    if cfg.num_groups > 1:
        return cfg.topk_groups * (cfg.num_experts // cfg.num_groups)
    return cfg.num_experts


def check_replay(
    experts_TK: Tensor, tokens: int, num_experts: int, max_k: int, name: str = "experts"
) -> None:
    """ValueError naming `name` unless `experts_TK` is a (tokens, K) integer tensor with
    1 <= K <= max_k whose entries are expert ids in [0, num_experts) or -1 (an empty slot),
    with no expert twice in one token's row."""
    check_replay_shape(experts_TK, tokens, max_k, name)
    check_expert_ids(experts_TK, num_experts, name)


def check_replay_shape(experts_TK: Tensor, tokens: int, max_k: int, name: str) -> None:
    """The part of `check_replay` that reads no values: type, dtype, shape and K."""
    if not isinstance(experts_TK, Tensor):
        raise ValueError(f"{name} must be a tensor of expert ids, got {type(experts_TK).__name__}")
    dtype = experts_TK.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"{name} must hold integer expert ids, got dtype {dtype}")
    if experts_TK.dim() != 2 or experts_TK.shape[0] != tokens:
        raise ValueError(
            f"{name} has shape {tuple(experts_TK.shape)}: expected ({tokens}, K), one row of "
            "expert ids per token"
        )
    K = experts_TK.shape[1]
    if not 1 <= K <= max_k:
        raise ValueError(
            f"{name} gives {K} expert slots per token: this model's router gives 1..{max_k}"
        )


def check_expert_ids(experts: Tensor, num_experts: int, name: str) -> None:
    """ValueError naming `name` unless every entry of `experts` (..., K) is an expert id in
    [0, num_experts) or -1 (an empty slot), with no expert twice in one row of K."""
    if not experts.numel():
        return
    ids = experts.long()
    low, high = int(ids.min()), int(ids.max())
    if low < -1 or high >= num_experts:
        bad = low if low < -1 else high
        raise ValueError(
            f"{name} holds expert id {bad}: this model's experts are 0..{num_experts - 1} "
            "(-1 marks an empty slot)"
        )
    if ids.shape[-1] > 1:
        ordered = ids.sort(dim=-1).values
        repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        if bool(repeated.any()):
            where = repeated.any(dim=-1).nonzero()[0].tolist()
            raise ValueError(
                f"{name} names an expert twice for token {where[0]}: {ids[tuple(where)].tolist()}"
            )


def replay_weights(scores_TE: Tensor, experts_TK: Tensor) -> Tensor:
    """The router's scores at `experts_TK` (0 in empty slots): the weights before any
    renormalisation or scaling, exactly the values a router takes for its own choice."""
    valid_TK = experts_TK >= 0
    return scores_TE.gather(1, experts_TK.clamp_min(0)) * valid_TK


def _widen(t_TK: Tensor, K: int, fill: float) -> Tensor:
    """`t_TK` with columns of `fill` appended up to K."""
    if t_TK.shape[1] == K:
        return t_TK
    return F.pad(t_TK, (0, K - t_TK.shape[1]), value=fill)


def _keep_first(
    experts_TK: Tensor, weights_TK: Tensor, top_k: int | Tensor | None
) -> tuple[Tensor, Tensor]:
    """With per-token counts, empty every slot past a token's own count (expert -1)."""
    if not isinstance(top_k, Tensor):
        return experts_TK, weights_TK
    keep_TK = torch.arange(experts_TK.shape[1], device=experts_TK.device) < top_k[:, None]
    return experts_TK.masked_fill(~keep_TK, -1), weights_TK * keep_TK


class TopKRouter(Router):
    """Token choice: each token takes its K best experts ("topk" and "switch").

    softmax (Mixtral, Qwen, OLMoE): weights are the softmax probabilities of the chosen experts,
    renormalised over the K when `norm_topk_prob`. sigmoid (DeepSeek-V3, Llama 4): weights are
    the sigmoid scores of the chosen experts, renormalised when `norm_topk_prob`. With
    `bias_update_rate > 0` a selection bias (a buffer updated outside autograd by
    `moekit.moe.losses.update_selection_bias`) is added to the scores for *choosing* experts
    only; the weights never see it. Group-limited routing keeps each token to its best
    `topk_groups` of `num_groups` expert groups. All weights are finally multiplied by
    `routed_scaling_factor`. "switch" is top-1 with the raw probability as weight (a
    renormalised top-1 weight would be constant 1 and starve the router of gradient).
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__(dim, cfg)
        self.top_k = cfg.top_k
        self.normalize = cfg.norm_topk_prob and cfg.router != "switch"
        if cfg.bias_update_rate > 0 or cfg.selection_bias:
            self.register_buffer("selection_bias", torch.zeros(cfg.num_experts))

    def forward(
        self,
        x_TD: Tensor,
        *,
        causal: bool | None = None,
        top_k: int | Tensor | None = None,
        experts: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> RouterOutput:
        cfg = self.cfg
        logits_TE = self.compute_logits(x_TD)
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
        choose = functools.partial(self._choose, scores_TE, top_k)
        return self._decide(logits_TE, scores_TE, choose, experts, rows, self.normalize)

    def _choose(self, scores_TE: Tensor, top_k: int | Tensor | None) -> tuple[Tensor, Tensor]:
        """The router's own choice: experts and their weights before renormalisation."""
        cfg = self.cfg
        k = self.top_k if top_k is None else self.check_top_k(top_k)
        if self.selection_bias is None and cfg.num_groups == 1:
            # Choosing by the scores themselves: the top-k values are the weights.
            weights_TK, experts_TK = scores_TE.topk(k, dim=-1)
        else:
            choice_TE = scores_TE.detach()
            if self.selection_bias is not None:
                choice_TE = choice_TE + self.selection_bias.float()
            if cfg.num_groups > 1:
                choice_TE = self._limit_groups(choice_TE)
            experts_TK = choice_TE.topk(k, dim=-1).indices
            weights_TK = scores_TE.gather(1, experts_TK)
        return _keep_first(experts_TK, weights_TK, top_k)

    def _limit_groups(self, choice_TE: Tensor) -> Tensor:
        """Mask (to -inf) every expert outside the token's best `topk_groups` groups."""
        cfg = self.cfg
        T = choice_TE.shape[0]
        grouped_TGE = choice_TE.view(T, cfg.num_groups, -1)
        if cfg.group_score == "max":
            group_TG = grouped_TGE.max(dim=-1).values
        else:
            group_TG = grouped_TGE.topk(2, dim=-1).values.sum(dim=-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_TG.topk(cfg.topk_groups, dim=-1).indices, True)
        masked = grouped_TGE.masked_fill(~keep_TG.unsqueeze(-1), float("-inf"))
        return masked.view(T, -1)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al., 2022): each expert takes the C tokens that score it highest.

    Scores are softmax over experts per token; C = ceil(capacity_factor * T / E), so on
    average a token is processed by `capacity_factor` experts, and a token may get anywhere
    from 0 to E. Load is balanced by construction (no aux loss needed). The weight of a
    (token, expert) pair is the token's softmax score for that expert.

    Causality: in batch mode an expert compares a token with every other token of the batch,
    later positions included, so a future token can change an earlier token's output: a leak
    in a causal language model, and a choice that cannot be made one token at a time when
    generating. The causal mode (`causal=True`, or the config's `expert_choice_causal`; the
    model's `causal_routing=True`, which generation and evaluation use) routes each token by
    token choice over the same scores: its `ceil(capacity_factor)` best-scoring experts, with
    the same softmax-score weights. It depends on the token alone, so it is causal, works on
    one token at a time and needs no state; what changes is the per-expert load, which is no
    longer balanced by construction.
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__(dim, cfg)
        assert cfg.capacity_factor is not None  # validated by MoEConfig
        self.capacity_factor = cfg.capacity_factor
        self.causal = cfg.expert_choice_causal
        self.causal_k = min(cfg.num_experts, math.ceil(cfg.capacity_factor))

    def capacity(self, num_tokens: int) -> int:
        return min(
            num_tokens, max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts))
        )

    def forward(
        self,
        x_TD: Tensor,
        *,
        causal: bool | None = None,
        top_k: int | Tensor | None = None,
        experts: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> RouterOutput:
        if experts is None:
            return self._route(x_TD, causal, top_k)
        # A replay takes the recorded experts as they are, in either mode: each (token,
        # expert) pair is weighted by the token's softmax score, as both modes weight it.
        if rows is None:
            logits_TE = self.compute_logits(x_TD)
            experts_TK, weights_TK = self._replayed(logits_TE.softmax(dim=-1), None, experts, None)
            return RouterOutput(weights_TK, experts_TK, logits_TE)
        own = self._route(x_TD, causal, top_k)
        scores_TE = own.logits.softmax(dim=-1)
        experts_TK, weights_TK = self._replayed(
            scores_TE, (own.experts, own.weights), experts, rows
        )
        return RouterOutput(weights_TK, experts_TK, own.logits)

    def _route(self, x_TD: Tensor, causal: bool | None, top_k: int | Tensor | None) -> RouterOutput:
        logits_TE = self.compute_logits(x_TD)
        scores_TE = logits_TE.softmax(dim=-1)
        if self.causal if causal is None else causal:
            k = self.causal_k if top_k is None else self.check_top_k(top_k)
            experts_TK = scores_TE.detach().topk(k, dim=-1).indices
            experts_TK, weights_TK = _keep_first(experts_TK, scores_TE.gather(1, experts_TK), top_k)
            return RouterOutput(weights_TK, experts_TK, logits_TE)
        if top_k is not None:
            raise ValueError("top_k cannot be set for batch-mode expert choice; route causally")
        chosen_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
        if x_TD.shape[0]:
            tokens_CE = scores_TE.detach().topk(self.capacity(x_TD.shape[0]), dim=0).indices
            chosen_TE.scatter_(0, tokens_CE, True)
        return _pack_token_major(chosen_TE, scores_TE, logits_TE)


def _pack_token_major(chosen_TE: Tensor, scores_TE: Tensor, logits_TE: Tensor) -> RouterOutput:
    """Turn a (T, E) selection mask into token-major slots, padding with expert -1."""
    counts_T = chosen_TE.sum(dim=1)
    K = max(1, int(counts_T.max())) if counts_T.numel() else 1
    # Chosen experts first, in expert-id order (stable sort of the mask, descending).
    order_TE = torch.sort(chosen_TE.to(torch.uint8), dim=1, descending=True, stable=True).indices
    experts_TK = order_TE[:, :K]
    valid_TK = chosen_TE.gather(1, experts_TK)
    weights_TK = scores_TE.gather(1, experts_TK) * valid_TK
    experts_TK = experts_TK.masked_fill(~valid_TK, -1)
    return RouterOutput(weights_TK, experts_TK, logits_TE)


class HierarchicalRouter(Router):
    """Two levels: a group router picks `group_top_k` (k1) of G = `router_groups` equal
    contiguous groups of experts, and inside each chosen group the expert router picks
    k2 = `top_k // group_top_k` experts, so a token gets k1 * k2 = `top_k` distinct experts
    (ordinary global ids) all inside its k1 groups.

    Scores: p(g) = softmax over the group router's G logits, p(e|g) = softmax of the expert
    router's logits over the experts of g alone. An expert's weight is p(g) * p(e|g) (then
    renormalised over the token's K when `norm_topk_prob`, and scaled by
    `routed_scaling_factor`). The logits it returns are `group_logit[g] + log p(e|g)`: their
    softmax over all E experts is exactly p(g) * p(e|g), so every reader of router logits
    (load balancing, entropy, analysis, replay) sees the joint distribution, and the z-loss of
    these logits is the group router's z-loss.

    Selection biases (aux-loss-free balancing, updated outside autograd by `update_biases`):
    `group_selection_bias` (G) is added to p(g) for choosing groups (`group_bias_update_rate`),
    `selection_bias` (E) to p(e|g) for choosing within a group (`bias_update_rate`); neither
    touches the weights. A per-call `top_k` of n takes ceil(n / k1) experts in each chosen group
    and keeps the n heaviest; a replay weights the recorded experts by p(g) * p(e|g).
    """

    group_selection_bias: Tensor | None

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__(dim, cfg)
        self.groups, self.k1 = cfg.router_groups, cfg.group_top_k
        self.per_group = cfg.num_experts // cfg.router_groups
        self.k2 = cfg.top_k // cfg.group_top_k
        self.normalize = cfg.norm_topk_prob
        self.group_weight = nn.Parameter(torch.empty(self.groups, dim, dtype=torch.float32))
        if cfg.bias_update_rate > 0 or cfg.selection_bias:
            self.register_buffer("selection_bias", torch.zeros(cfg.num_experts))
        bias_G = torch.zeros(self.groups) if cfg.group_bias_update_rate > 0 else None
        self.register_buffer("group_selection_bias", bias_G)

    def _logits(self, x_TD: Tensor) -> Tensor:
        expert_TGe = super()._logits(x_TD).view(x_TD.shape[0], self.groups, self.per_group)
        group_TG = _project(x_TD, self.group_weight.float())
        return (group_TG.unsqueeze(-1) + expert_TGe.log_softmax(dim=-1)).flatten(1)

    def group_probs(self, logits_TE: Tensor) -> Tensor:
        """p(g) (T, G) from the logits this router returns."""
        return logits_TE.view(-1, self.groups, self.per_group).logsumexp(dim=-1).softmax(dim=-1)

    def forward(
        self,
        x_TD: Tensor,
        *,
        causal: bool | None = None,
        top_k: int | Tensor | None = None,
        experts: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> RouterOutput:
        logits_TE = self.compute_logits(x_TD)
        scores_TE = logits_TE.softmax(dim=-1)  # p(g) * p(e|g)
        choose = functools.partial(self._choose, logits_TE, scores_TE, top_k)
        return self._decide(logits_TE, scores_TE, choose, experts, rows, self.normalize)

    def _choose(
        self, logits_TE: Tensor, scores_TE: Tensor, top_k: int | Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Groups first, then experts inside them; weights before renormalisation."""
        T, G, Ge = logits_TE.shape[0], self.groups, self.per_group
        k = self.k1 * self.k2 if top_k is None else self.check_top_k(top_k)
        k2 = min(Ge, -(-k // self.k1))
        lg_TGe = logits_TE.detach().view(T, G, Ge)
        choice_TG = self.group_probs(logits_TE.detach())
        if self.group_selection_bias is not None:
            choice_TG = choice_TG + self.group_selection_bias.float()
        groups_TK1 = choice_TG.topk(self.k1, dim=-1).indices
        inner_TGe = lg_TGe.softmax(dim=-1)  # p(e|g)
        if self.selection_bias is not None:
            inner_TGe = inner_TGe + self.selection_bias.float().view(G, Ge)
        inner_TK1e = inner_TGe.gather(1, groups_TK1.unsqueeze(-1).expand(-1, -1, Ge))
        local_TK1K2 = inner_TK1e.topk(k2, dim=-1).indices
        experts_TK = (groups_TK1.unsqueeze(-1) * Ge + local_TK1K2).flatten(1)
        weights_TK = scores_TE.gather(1, experts_TK)
        if experts_TK.shape[1] != k or isinstance(top_k, Tensor):  # keep the heaviest k
            order_TK = weights_TK.detach().argsort(dim=-1, descending=True)[:, :k]
            experts_TK, weights_TK = experts_TK.gather(1, order_TK), weights_TK.gather(1, order_TK)
        return _keep_first(experts_TK, weights_TK, top_k)

    @torch.no_grad()
    def update_biases(self, tokens_per_expert_E: Tensor) -> None:
        """One aux-loss-free step at each level that has a bias: a group's load is the copies
        of its experts, and an expert is compared with the mean of its own group (the expert
        bias only matters against the other experts of its group)."""
        load_GE = tokens_per_expert_E.float().view(self.groups, self.per_group)
        if self.group_selection_bias is not None:
            load_G = load_GE.sum(dim=-1)
            rate = self.cfg.group_bias_update_rate
            self.group_selection_bias.add_(rate * torch.sign(load_G.mean() - load_G))
        if self.selection_bias is not None:
            step_GE = torch.sign(load_GE.mean(dim=-1, keepdim=True) - load_GE)
            self.selection_bias.add_(self.cfg.bias_update_rate * step_GE.flatten())

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        super().init_weights(std, generator)
        nn.init.normal_(self.group_weight, mean=0.0, std=std, generator=generator)
        if self.group_selection_bias is not None:
            self.group_selection_bias.zero_()


def build_router(dim: int, cfg: MoEConfig) -> Router:
    """The router that `cfg.router` names."""
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(dim, cfg)
    if cfg.router == "hierarchical":
        return HierarchicalRouter(dim, cfg)
    return TopKRouter(dim, cfg)
