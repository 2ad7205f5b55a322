"""Validation of hierarchical routing's settings in `MoEConfig` (`router="hierarchical"`).

A hierarchical router splits the `num_experts` experts into `router_groups` equal contiguous
groups; a group router picks `group_top_k` groups per token and a second router inside each
chosen group picks `top_k // group_top_k` of its experts, so `top_k` stays the total number of
experts a token is sent to.
"""

from __future__ import annotations

from typing import Any

from moekit.validate import check_non_negative, check_positive, fail

OWNER = "MoEConfig"


def check_hierarchical(cfg: Any) -> None:
    """ValueError naming the field unless `cfg`'s hierarchical settings fit together; the
    group settings must keep their defaults with any other router."""
    check_positive(OWNER, router_groups=cfg.router_groups, group_top_k=cfg.group_top_k)
    check_non_negative(
        OWNER,
        group_aux_loss_weight=cfg.group_aux_loss_weight,
        group_bias_update_rate=cfg.group_bias_update_rate,
    )
    if cfg.router != "hierarchical":
        for name, default in (("router_groups", 1), ("group_top_k", 1)):
            if getattr(cfg, name) != default:
                raise fail(
                    OWNER, name, getattr(cfg, name), "is only used with router='hierarchical'"
                )
        if cfg.group_bias_update_rate:
            raise fail(
                OWNER, "group_bias_update_rate", cfg.group_bias_update_rate,
                "is only used with router='hierarchical'",
            )  # fmt: skip
        return
    groups, chosen, experts = cfg.router_groups, cfg.group_top_k, cfg.num_experts
    if groups < 2:
        raise fail(OWNER, "router_groups", groups, "must be >= 2 with router='hierarchical'")
    if experts % groups:
        raise fail(OWNER, "router_groups", groups, f"must divide num_experts ({experts})")
    if chosen > groups:
        raise fail(OWNER, "group_top_k", chosen, f"must be <= router_groups ({groups})")
    if cfg.top_k % chosen:
        raise fail(
            OWNER, "top_k", cfg.top_k,
            f"must be a multiple of group_top_k ({chosen}): each chosen group gives "
            "top_k // group_top_k experts",
        )  # fmt: skip
    per_group = experts // groups
    if cfg.top_k // chosen > per_group:
        raise fail(
            OWNER, "top_k", cfg.top_k,
            f"asks {cfg.top_k // chosen} experts of each chosen group, but a group holds "
            f"{per_group} (num_experts / router_groups)",
        )  # fmt: skip
    if cfg.num_groups != 1:
        raise fail(
            OWNER, "num_groups", cfg.num_groups,
            "must be 1 with router='hierarchical' (its groups are router_groups)",
        )  # fmt: skip
    if cfg.score_func != "softmax":
        raise fail(
            OWNER, "score_func", cfg.score_func, "must be 'softmax' with router='hierarchical'"
        )
