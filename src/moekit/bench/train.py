"""`moekit bench train`: training throughput of our trainer's step against transformers'
MixtralForCausalLM at the same config and batch, timed round-robin in one process.

Both sides run a full optimizer step: forward, next-token loss plus the router
load-balancing loss, backward, gradient clipping and AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moekit.bench.timing import time_interleaved, with_prefix
from moekit.config import ModelConfig
from moekit.interop.mixtral import check_mixtral_compatible, hf_config
from moekit.model import build_model
from moekit.params import count_params
from moekit.presets import get_preset
from moekit.training.config import TrainConfig
from moekit.training.optim import build_optimizer
from moekit.training.step import optimizer_step

HF_IMPLS = ("eager", "grouped_mm")


@dataclass(frozen=True)
class TrainBench:
    """What `bench_train` measured: the setting, the config's parameter counts, and tokens per
    second of one optimizer step, ours and transformers' per experts implementation (empty
    without transformers)."""

    preset: str
    batch_size: int
    seq_len: int
    total_params: int
    active_params: int
    ours_tokens_per_s: float
    hf_tokens_per_s: dict[str, float]

    @property
    def hf_best_impl(self) -> str | None:
        """transformers' fastest experts implementation, or None without transformers."""
        hf = self.hf_tokens_per_s
        return max(hf, key=hf.__getitem__) if hf else None

    @property
    def ours_over_hf_best(self) -> float | None:
        """Our throughput over transformers' best (> 1: ours is faster)."""
        best = self.hf_best_impl
        return self.ours_tokens_per_s / self.hf_tokens_per_s[best] if best else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "ours_tokens_per_s": self.ours_tokens_per_s,
            "hf_tokens_per_s": dict(self.hf_tokens_per_s),
            "hf_best_impl": self.hf_best_impl,
            "ours_over_hf_best": self.ours_over_hf_best,
        }


def _hf_mixtral(cfg: ModelConfig, impl: str) -> torch.nn.Module:
    from transformers import MixtralForCausalLM

    hf_cfg = hf_config(cfg)
    hf_cfg.output_router_logits = True  # so its loss includes the load-balancing loss, as ours
    hf_cfg._experts_implementation = impl
    model = MixtralForCausalLM(hf_cfg).train()
    assert model.config._attn_implementation == "sdpa"  # the same attention kernel as ours
    return model


def bench_train(
    preset: str = "demo",
    batch_size: int = 16,
    seq_len: int = 256,
    repeats: int = 5,
    seed: int = 0,
) -> TrainBench:
    """Tokens per second of one optimizer step, ours and transformers' (each experts
    implementation), on the same random batch of `batch_size` x `seq_len` tokens.

    Returns a TrainBench: `ours_tokens_per_s`, `hf_tokens_per_s` (per implementation),
    `hf_best_impl` and `ours_over_hf_best` (> 1: ours is faster), plus the config figures.
    """
    cfg = get_preset(preset)
    check_mixtral_compatible(cfg)
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the preset's max_seq_len={cfg.max_seq_len}")
    torch.manual_seed(seed)
    rows = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))
    inputs, targets = rows[:, :-1], rows[:, 1:]
    tc = TrainConfig(batch_size=batch_size, seq_len=seq_len)

    ours = build_model(cfg, seed=seed)
    ours_opt = build_optimizer(ours, tc)

    def ours_step() -> None:
        optimizer_step(ours, ours_opt, [(inputs, targets)], grad_accum=1, grad_clip=tc.grad_clip)

    fns = {"ours": ours_step}
    for impl in HF_IMPLS:
        try:
            model = _hf_mixtral(cfg, impl)
        except ImportError:
            break
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2))

        def hf_step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            out = model(input_ids=inputs, labels=inputs)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[f"hf_{impl}"] = hf_step
    times = time_interleaved(fns, repeats, min_sample_s=0.0)
    tokens = batch_size * seq_len
    pc = count_params(cfg)
    return TrainBench(
        preset=preset,
        batch_size=batch_size,
        seq_len=seq_len,
        total_params=pc.total,
        active_params=pc.active,
        ours_tokens_per_s=tokens / times["ours"],
        hf_tokens_per_s={k: tokens / v for k, v in with_prefix(times, "hf_").items()},
    )
