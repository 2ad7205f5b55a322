"""Sparse upcycling: turn a trained dense model into an MoE that starts where it stands.

Every dense MLP becomes E experts, copies of it (with `granularity` g > 1, each copy is cut into
g fine-grained experts along its hidden dimension, and E = copies x g). Attention, embeddings
and norms carry over; each MoE layer gets a fresh router. With plain copies and softmax top-k
routing that renormalises the chosen weights, the upcycled model computes exactly the dense
model's function, whatever the router says: the chosen experts are identical and their
weights sum to one. Fine-grained experts have their down projections scaled by g, so a token
spreading its weight evenly over the g slices of one copy gets the dense MLP back; other
routings differ, which training then exploits. `noise` multiplies each expert's weights by
(1 + noise * N(0, 1)) to break the symmetry between copies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.model_dir import ModelDir, load_weights


def upcycle(
    dense_dir: str | Path,
    out_dir: str | Path,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    granularity: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    aux_loss_weight: float = 0.01,
    z_loss_weight: float = 0.001,
    first_dense_layers: int = 0,
    layer_step: int = 1,
    dense_layers: list[int] | None = None,
) -> ModelConfig:
    """Write the upcycled MoE of the dense model directory `dense_dir` into `out_dir`; returns
    its config. The router is initialised like a freshly built model's. The MoE routes by
    softmax top-k; `first_dense_layers` and `layer_step`, or a list of `dense_layers`, place
    its MoE layers as `MoEConfig` does (the other layers keep their dense MLP)."""
    src, out = Path(dense_dir), Path(out_dir)
    ModelDir(out).refuse_overwrite("upcycling")
    dense = ModelDir(src).config()
    if dense.moe is not None:
        raise ValueError(f"{src} is already a Mixture-of-Experts model")
    if granularity < 1 or num_experts % granularity:
        raise ValueError(
            f"granularity={granularity} is invalid: it must divide the number of experts "
            f"({num_experts})"
        )
    hidden = dense.dense_hidden
    if hidden % granularity:
        raise ValueError(f"granularity={granularity} must divide the MLP width ({hidden})")
    if noise < 0:
        raise ValueError(f"noise={noise} is invalid: must be >= 0")
    expert_hidden = hidden // granularity
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden=expert_hidden,
        aux_loss_weight=aux_loss_weight,
        z_loss_weight=z_loss_weight,
        first_dense_layers=first_dense_layers,
        layer_step=layer_step,
        dense_layers=dense_layers,
    )
    cfg = _with_moe(dense, moe)
    state = load_weights(src)
    gen = torch.Generator().manual_seed(seed)
    moe_layers = set(cfg.moe_layers)
    out_state = {
        k: v for k, v in state.items() if ".ffn." not in k or int(k.split(".")[1]) not in moe_layers
    }
    for i in sorted(moe_layers):
        prefix = f"layers.{i}.ffn"
        names = ["w_up", "w_down"] + (["w_gate"] if cfg.gated else [])
        weights = {n: state[f"{prefix}.{n}.weight"] for n in names}
        stacks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for e in range(num_experts):
            s = e % granularity
            rows = slice(s * expert_hidden, (s + 1) * expert_hidden)
            for n in names:
                w = weights[n][:, rows] * granularity if n == "w_down" else weights[n][rows]
                if noise:
                    w = w * (1 + noise * torch.randn(w.shape, generator=gen, dtype=w.dtype))
                stacks[n].append(w)
        for n in names:
            out_state[f"{prefix}.experts.{n}"] = torch.stack(stacks[n])
        router = torch.empty(num_experts, cfg.dim)
        torch.nn.init.normal_(router, mean=0.0, std=cfg.init_std, generator=gen)
        out_state[f"{prefix}.router.weight"] = router
    target = ModelDir(out)
    target.save_weights(out_state)
    target.save_config(cfg)
    for path in ModelDir(src).tokenizer_files():
        shutil.copyfile(path, out / path.name)
    return cfg


def _with_moe(dense: ModelConfig, moe: MoEConfig) -> ModelConfig:
    """The dense config with `moe`; a ValueError when its placement leaves no MoE layer."""
    cfg = ModelConfig.from_dict({**dense.to_dict(), "moe": moe.to_dict()})
    if not cfg.moe_layers:
        placement = (
            f"dense_layers={moe.dense_layers}"
            if moe.dense_layers is not None
            else f"first_dense_layers={moe.first_dense_layers}, layer_step={moe.layer_step}"
        )
        raise ValueError(f"{placement} leaves no MoE layer in a model of {cfg.num_layers} layers")
    return cfg
