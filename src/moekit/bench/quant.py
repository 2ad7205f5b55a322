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
import torch.nn.functional as F
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
from moekit.quant.weight import QuantWeight
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


def run_data(model_dir: ModelDir) -> tuple[DataConfig, int]:
    """The data and the seed of the run that trained the model (its run.json), else the
    builtin corpus and seed 0."""
    run = model_dir / ModelDir.RUN_CONFIG
    if not run.is_file():
        return DataConfig(), 0
    fields = json.loads(run.read_text())
    data = DataConfig.from_dict(fields.get("data") or {})
    return data, int((fields.get("train") or {}).get("seed", 0))


def validation_rows(model_dir: ModelDir, seq_len: int) -> Tensor:
    """The validation rows in the fixed shuffled order training evaluates them in (seeded with
    the run's seed), so that a capped number of rows samples every document, not the first."""
    data, seed = run_data(model_dir)
    tokenizer = Tokenizer.load(model_dir.path)
    _, packed = prepare_data(data, tokenizer.vocab_size, seq_len, tokenizer=tokenizer)
    order = torch.randperm(len(packed.val), generator=torch.Generator().manual_seed(seed))
    return packed.val[order]


def expert_bytes(model: Transformer) -> int:
    """The bytes of every MoE layer's routed experts (weights and buffers, as stored)."""
    return sum(
        t.numel() * t.element_size()
        for layer in model.moe_layers().values()
        for t in [*layer.experts.parameters(), *layer.experts.buffers()]
    )


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


def same_prefix(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of the tokens of `b` that `a` repeats before its first difference."""
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
    rows = validation_rows(src, seq_len)[: 8 * val_batches]
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
    # Speed: every setting and kernel timed in turn, interleaved.
    expert_fns, decode_fns = {}, {}
    for name, model in models.items():
        bits = 4 if name.startswith("int4") else 8
        for kernel in QUANT_KERNELS[bits] if name != "float32" else ("float",):
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
        greedy = same_prefix(_greedy(model, prompt_ids, new_tokens), greedy_ref)
        mine = {k.split("/")[1]: v for k, v in expert_s.items() if k.startswith(name + "/")}
        steps = {
            k.split("/")[1]: (v - decode_s[k.replace("/long", "/short")]) / DECODE_STEPS
            for k, v in decode_s.items()
            if k.startswith(name + "/") and k.endswith("/long")
        }
        result.append(
            QuantRow(
                name,
                expert_bytes(model),
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


# ---- kernels at real expert shapes ------------------------------------------------------------


@dataclass(frozen=True)
class KernelRow:
    """One expert's three products (gate, up: [F, D]; down: [D, F]) on `rows` rows with one
    setting and kernel: microseconds per expert, weight bytes read per expert, the rate they
    are read at, its share of the measured memory bandwidth and the speed against float32."""

    preset: str
    rows: int
    setting: str  # "float32", "int8", "int4 g32"
    kernel: str  # "float" for float32
    us: float
    weight_bytes: int
    gb_per_s: float
    of_bandwidth: float
    vs_float32: float


@dataclass(frozen=True)
class KernelBench:
    bandwidth: float  # bytes/s, measured in the same run
    threads: int
    experts: int
    rows: list[KernelRow]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


QUANT_KERNELS = {8: ("dequant", "torch"), 4: ("dequant", "torch", "compiled")}


def _expert_products(weights: dict[str, Any], kernel: str, x_MD: Tensor, h_MF: Tensor) -> Any:
    """A function computing every expert's three products once with `kernel`."""
    gate, up, down = weights["w_gate"], weights["w_up"], weights["w_down"]
    if kernel == "float":

        def run_float() -> None:
            for e in range(gate.shape[0]):
                F.linear(x_MD, gate[e]), F.linear(x_MD, up[e]), F.linear(h_MF, down[e])

        return run_float

    def run() -> None:
        for w in (gate, up, down):  # the weights are shared by every kernel's function
            w.kernel = kernel
        for e in range(gate.shape[0]):
            gate.matmul(x_MD, e), up.matmul(x_MD, e), down.matmul(h_MF, e)

    return run


def bench_quant_kernels(
    presets: tuple[str, ...] = ("olmoe-1b-7b", "qwen3-30b-a3b"),
    *,
    rows: tuple[int, ...] = (1, 4, 8),
    group_size: int = 32,
    experts: int = 16,
    repeats: int = 5,
) -> KernelBench:
    """Each quantised kernel against float32 at the routed-expert shapes of `presets` (random
    weights; `experts` experts, cycled so that their weights do not stay in the CPU caches),
    for each row count in `rows`: time per expert, weight bytes read per second and their share
    of the memory bandwidth measured in the same run."""
    from moekit.presets import get_preset
    from moekit.speed import measure_bandwidth

    bandwidth = measure_bandwidth()
    out: list[KernelRow] = []
    for name in presets:
        cfg = get_preset(name)
        if cfg.moe is None:
            raise ValueError(f"preset {name!r} has no MoE layers to measure the experts of")
        d, f = cfg.dim, cfg.moe.expert_hidden
        gen = torch.Generator().manual_seed(0)
        shapes = {"w_gate": (experts, f, d), "w_up": (experts, f, d), "w_down": (experts, d, f)}
        floats = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
        settings: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
            "float32": (floats, ("float",))
        }
        for bits in (8, 4):
            group = group_size if bits == 4 else None
            quant = {k: QuantWeight.from_float(w, bits, group) for k, w in floats.items()}
            settings["int8" if bits == 8 else f"int4 g{group_size}"] = (quant, QUANT_KERNELS[bits])
        for m in rows:
            x_MD, h_MF = torch.randn(m, d, generator=gen), torch.randn(m, f, generator=gen)
            fns = {
                (setting, kernel): _expert_products(weights, kernel, x_MD, h_MF)
                for setting, (weights, kernels) in settings.items()
                for kernel in kernels
            }
            with torch.no_grad():
                times = time_interleaved({f"{s}/{k}": fn for (s, k), fn in fns.items()}, repeats)
            ref = times["float32/float"]
            for (setting, kernel), _ in fns.items():
                weights = settings[setting][0]
                per_expert = sum(_oneexpert_bytes(w) for w in weights.values()) // experts
                t = times[f"{setting}/{kernel}"] / experts
                rate = per_expert / t
                row = KernelRow(
                    name, m, setting, kernel, t * 1e6, per_expert, rate / 1e9,
                    rate / bandwidth, ref / experts / t,
                )  # fmt: skip
                out.append(row)
    return KernelBench(bandwidth, torch.get_num_threads(), experts, out)


def _oneexpert_bytes(w: Tensor | QuantWeight) -> int:
    if isinstance(w, QuantWeight):
        return w.nbytes()
    return w.numel() * w.element_size()
