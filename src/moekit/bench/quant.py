"""`moekit bench quant`: what int8 and int4 experts cost in quality and speed, against the
float32 model, measured in one run on the same data.

Quality: validation loss on the model's own validation split (the run's data settings from
run.json when present, else the builtin corpus), top-1 agreement with float32's next-token
choice on those tokens, and greedy agreement (the share of greedily generated tokens equal to
float32's before the first difference). Speed at decode, batch 1: the routed experts of one
MoE layer on one token, and whole greedy decode steps with a KV cache, each quantised kernel
against float32, timed round-robin.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.bench.timing import time_interleaved
from moekit.config import QuantizationConfig
from moekit.data.config import DataConfig
from moekit.data.loader import prepare_data
from moekit.data.tokenizer import Tokenizer
from moekit.infer.generate import greedy_generate
from moekit.model import Transformer
from moekit.model_dir import ModelDir
from moekit.moe import dispatch
from moekit.quant.build import quantize_model, set_kernel
from moekit.training.step import eval_loss


@dataclass(frozen=True)
class QuantRow:
    """One setting's figures: `name` ("float32", "int8", "int4 g32"), its expert bytes,
    validation loss, agreements with float32, and decode speeds per kernel."""

    name: str
    expert_bytes: int
    val_loss: float
    top1_agreement: float
    greedy_agreement: float
    experts_us: dict[str, float] = field(default_factory=dict)  # kernel -> microseconds
    decode_tokens_per_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantBench:
    model: str
    val_tokens: int
    prompts: int
    new_tokens: int
    rows: list[QuantRow]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def _val_rows(model_dir: ModelDir, seq_len: int) -> Tensor:
    """The validation rows in the fixed shuffled order training evaluates them in (seeded with
    the run's seed), so that a capped number of rows samples every document, not the first."""
    run = model_dir / ModelDir.RUN_CONFIG
    data, seed = DataConfig(), 0
    if run.is_file():
        fields = json.loads(run.read_text())
        data = DataConfig.from_dict(fields.get("data") or {})
        seed = int((fields.get("train") or {}).get("seed", 0))
    tokenizer = Tokenizer.load(model_dir.path)
    _, packed = prepare_data(data, tokenizer.vocab_size, seq_len, tokenizer=tokenizer)
    order = torch.randperm(len(packed.val), generator=torch.Generator().manual_seed(seed))
    return packed.val[order]


def _expert_bytes(model: Transformer) -> int:
    tensors = [*model.moe_layers()[next(iter(model.moe_layers()))].experts.buffers()]
    tensors += [*model.moe_layers()[next(iter(model.moe_layers()))].experts.parameters()]
    per_layer = sum(t.numel() * t.element_size() for t in tensors)
    return per_layer * len(model.moe_layers())


@torch.no_grad()
def _agreement(model: Transformer, ref: Transformer, rows: Tensor) -> float:
    agree = total = 0
    for start in range(0, len(rows), 8):
        x = rows[start : start + 8, :-1]
        a = model(x, causal_routing=True).logits.argmax(-1)
        b = ref(x, causal_routing=True).logits.argmax(-1)
        agree += int((a == b).sum())
        total += a.numel()
    return agree / max(total, 1)


def _greedy(model: Transformer, prompts: list[list[int]], new: int) -> list[list[int]]:
    return [greedy_generate(model, p, new) for p in prompts]


def _same_prefix(a: list[list[int]], b: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        same, total = same + n, total + max(len(y), 1)
    return same / max(total, 1)


def _experts_call(model: Transformer) -> Any:
    """One token's routed experts in the first MoE layer (K copies, routed as the model
    routes a random hidden state)."""
    layer = next(iter(model.moe_layers().values()))
    x_TD = torch.randn(1, model.cfg.dim, generator=torch.Generator().manual_seed(0))
    decision = layer.router(x_TD, causal=True)
    backend = layer.experts.backend_for(
        layer.backend, decision.experts.numel(), layer.cfg.num_experts, x_TD.device
    )
    p = dispatch.plan(decision.experts, decision.weights, layer.cfg.num_experts, sort=True)
    x_SD = dispatch.permute(x_TD, p)
    return lambda: backend.fn(x_SD, p.expert_S, p.tokens_per_expert, p.weight_S, layer.experts)


def bench_quant(
    model_dir: str | Path,
    *,
    group_size: int = 32,
    val_batches: int = 8,
    prompts: int = 8,
    new_tokens: int = 32,
    repeats: int = 5,
) -> QuantBench:
    """Quality and decode speed of int8 and int4 (`group_size`) routed experts against the
    float32 model in `model_dir`, measured in one run (see the module docstring)."""
    # long function: one benchmark run, measured step by step in one place
    src = ModelDir(model_dir).require_model()
    from moekit.model_dir import load_model

    ref = load_model(src.path).eval()
    seq_len = min(256, ref.cfg.max_seq_len - 1)
    rows = _val_rows(src, seq_len)[: 8 * val_batches]
    if not len(rows):
        raise ValueError(f"{src}: its data has no validation rows to measure the loss on")
    settings = {
        "float32": None,
        "int8": QuantizationConfig(bits=8),
        f"int4 g{group_size}": QuantizationConfig(bits=4, group_size=group_size),
    }
    models = {
        name: ref if q is None else quantize_model(load_model(src.path).eval(), q)
        for name, q in settings.items()
    }
    prompt_ids = [r[:32].tolist() for r in rows[:prompts]]
    greedy_ref = _greedy(ref, prompt_ids, new_tokens)
    kernels = ("dequant", "torch")
    # Speed: every setting and kernel timed in turn, interleaved.
    expert_fns, decode_fns = {}, {}
    for name, model in models.items():
        for kernel in kernels if name != "float32" else ("float",):
            key = f"{name}/{kernel}"
            if kernel != "float":
                set_kernel(model, kernel)
            expert_fns[key] = _experts_call(model)
            decode_fns[key + "/long"] = _generate(model, DECODE_STEPS + 1)
            decode_fns[key + "/short"] = _generate(model, 1)
    with torch.no_grad():
        expert_s = _timed(models, expert_fns, repeats)
        decode_s = _timed(models, decode_fns, max(1, repeats // 2))
    result = []
    for name, model in models.items():
        set_kernel(model, "auto")
        with torch.no_grad():
            loss = eval_loss(model, rows, batch_size=8, max_batches=val_batches)
        top1 = _agreement(model, ref, rows[:8]) if model is not ref else 1.0
        greedy = _same_prefix(_greedy(model, prompt_ids, new_tokens), greedy_ref)
        mine = {k.split("/")[1]: v for k, v in expert_s.items() if k.startswith(name + "/")}
        steps = {
            k.split("/")[1]: (v - decode_s[k.replace("/long", "/short")]) / DECODE_STEPS
            for k, v in decode_s.items()
            if k.startswith(name + "/") and k.endswith("/long")
        }
        result.append(
            QuantRow(
                name,
                _expert_bytes(model),
                loss,
                top1,
                greedy,
                {k: v * 1e6 for k, v in mine.items()},
                {k: 1.0 / v for k, v in steps.items()},
            )
        )
    return QuantBench(str(src), int(rows[:, 1:].numel()), len(prompt_ids), new_tokens, result)


DECODE_STEPS = 16


def _generate(model: Transformer, new: int) -> Any:
    """Greedy generation at batch 1 from a 32-token prompt with a fresh KV cache: the decode
    step's time is the difference between `DECODE_STEPS + 1` new tokens and 1, over
    DECODE_STEPS."""
    prompt = list(range(1, 33))
    return lambda: greedy_generate(model, prompt, new)


def _timed(models: dict[str, Transformer], fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Seconds per call of each function, with each model's kernel set for its calls."""

    def with_kernel(key: str, fn: Any) -> Any:
        name, kernel = key.split("/")[:2]
        model = models[name]

        def call() -> object:
            if kernel != "float":
                set_kernel(model, kernel)
            return fn()

        return call

    return time_interleaved({k: with_kernel(k, f) for k, f in fns.items()}, repeats)
