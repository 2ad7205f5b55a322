"""`moekit doctor`: catch the silent failures of Mixture-of-Experts models.

The failures MoE users meet most often raise no error: experts die, one expert takes most of
the load, the router collapses, the aux-loss-free bias never moves, nothing balances the load,
LoRA adapters never train, a conversion duplicates or drops experts, routers are stored in low
precision. `diagnose` checks a model directory (and a training run's metrics and checkpoints)
for each of them and returns one `Check` per failure mode: `ok`, `warning` or `problem`, with
the evidence (the numbers) and what to do.

The checks, in the order they are reported (docs/doctor.md explains each):

  dead_experts          experts that get no (or almost no) tokens on a sample of text
  load_imbalance        max over mean routed copies per expert on the sample
  router_collapse       mean routing entropy, as a fraction of log(E), on the sample
  training_dead_experts experts the run's metrics.jsonl reports dead in its last records
  selection_bias        aux-loss-free balancing: a bias that is all zeros or never changes
  load_balancing        an aux-loss weight of zero with nothing else balancing the load
  adapters              fine-tuned weights (LoRA B, ESFT/full experts) that never changed
  expert_copies         experts that are exact copies of each other, or all zeros
  router_precision      router weights or selection biases stored in bf16/fp16

A check that does not apply to the model (a LoRA check on a model without adapters) is `ok`,
says why it did not apply, and has `data["applicable"] = False`.

Heavy imports (torch, safetensors, rich) happen inside functions: importing this module to
build the command line costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from moekit.model_dir import ModelDir

if TYPE_CHECKING:
    import torch

    from moekit.config import ModelConfig

Status = Literal["ok", "warning", "problem"]
STATUSES: tuple[Status, ...] = ("ok", "warning", "problem")

# Defaults of the thresholds (see `diagnose` and docs/doctor.md).
SAMPLE_TOKENS = 4096
SAMPLE_SEQ_LEN = 256
DEAD_SHARE = 0.1
IMBALANCE_WARNING = 2.0
IMBALANCE_PROBLEM = 3.0
COLLAPSE_ENTROPY = 0.1
DEAD_WINDOW = 3

_PROJECTIONS = ("w_gate", "w_up", "w_down")
_FLOAT32_NAMES = ("F32", "F64")  # safetensors dtype names precise enough for routing


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    name: a stable identifier ("dead_experts"); status: "ok", "warning" or "problem";
    evidence: a sentence with the numbers that led to the status; advice: what to do (empty
    when there is nothing to do); data: the numbers behind the evidence, for `--json`.
    """

    name: str
    status: Status
    evidence: str
    advice: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Check.status={self.status!r} is invalid: one of {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "evidence": self.evidence,
            "advice": self.advice,
            "data": self.data,
        }


def _not_applicable(name: str, why: str) -> Check:
    return Check(name, "ok", f"not applicable: {why}", data={"applicable": False})


def worst_status(checks: Iterable[Check]) -> Status:
    """The most serious status among `checks` ("ok" for none)."""
    return max((c.status for c in checks), key=STATUSES.index, default="ok")


# ---- the public entry point -----------------------------------------------------------------


def diagnose(
    model_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    sample_tokens: int = SAMPLE_TOKENS,
    seq_len: int = SAMPLE_SEQ_LEN,
    device: str | None = "auto",
    dead_share: float = DEAD_SHARE,
    imbalance_warning: float = IMBALANCE_WARNING,
    imbalance_problem: float = IMBALANCE_PROBLEM,
    collapse_entropy: float = COLLAPSE_ENTROPY,
    dead_window: int = DEAD_WINDOW,
) -> list[Check]:
    """Check the model directory `model_dir` for the silent MoE failures; one `Check` each.

    run_dir: a training run directory (metrics.jsonl, train_state/) to check as well; None
        uses `model_dir` itself when it holds either (a trained model is its own run).
    sample_tokens, seq_len: how much builtin-corpus text (all four domains, in equal parts)
        is routed through the model to measure load, in rows of `seq_len` tokens.
    device: where the sample runs ("auto": CUDA when present, else the CPU).
    dead_share: an expert with fewer routed copies than this fraction of an even share
        (copies / E) is nearly dead (warning); one with none is dead (problem).
    imbalance_warning, imbalance_problem: max over mean copies per expert above which a
        layer's load is a warning, a problem (1.0 is perfect balance; with top-k routing the
        most possible is E / K).
    collapse_entropy: a layer whose mean routing entropy is below this fraction of log(E)
        has collapsed (problem): each token's router distribution is near one-hot.
    dead_window: in the run's metrics, an expert reported dead in each of the last
        `dead_window` logged training records is a problem; dead in the last one only, a
        warning.

    A config.json that cannot be read is a ValueError or FileNotFoundError (nothing can be
    checked); weights that do not load are reported by the checks that need them.
    """
    from moekit.config import ModelConfig

    _check_thresholds(
        sample_tokens=sample_tokens,
        seq_len=seq_len,
        dead_share=dead_share,
        imbalance_warning=imbalance_warning,
        imbalance_problem=imbalance_problem,
        collapse_entropy=collapse_entropy,
        dead_window=dead_window,
    )
    model_dir = Path(model_dir)
    ModelDir(model_dir).require_model()
    cfg = ModelConfig.load(model_dir)
    run = resolve_run_dir(model_dir, run_dir)
    weights = _WeightFiles(model_dir)

    sample: _Sample | str
    if cfg.moe is None:
        sample = "the model is dense (no MoE layer)"
    else:
        sample = _measure_routing(
            model_dir, cfg, tokens=sample_tokens, seq_len=seq_len, device=device
        )
    return [
        _check_dead_experts(sample, dead_share),
        _check_imbalance(sample, cfg, imbalance_warning, imbalance_problem),
        _check_collapse(sample, collapse_entropy),
        _check_training_dead(cfg, run, dead_window),
        _check_selection_bias(cfg, weights, run),
        _check_load_balancing(cfg),
        _check_adapters(cfg, model_dir, weights),
        _check_expert_copies(cfg, weights),
        _check_router_precision(cfg, weights, sample),
    ]


def _check_thresholds(**values: float) -> None:
    for name in ("sample_tokens", "seq_len", "dead_window"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
    for name in ("dead_share", "collapse_entropy"):
        if not 0.0 <= values[name] <= 1.0:
            raise ValueError(f"{name}={values[name]!r} is invalid: must be in [0, 1]")
    if not 1.0 <= values["imbalance_warning"] <= values["imbalance_problem"]:
        raise ValueError(
            f"imbalance_warning={values['imbalance_warning']!r}, imbalance_problem="
            f"{values['imbalance_problem']!r} are invalid: need 1 <= warning <= problem"
        )


def resolve_run_dir(model_dir: Path, run_dir: str | Path | None) -> Path | None:
    """The training run `diagnose` checks: `run_dir` (which must hold a run), else
    `model_dir` when it holds one, else None."""
    if run_dir is not None:
        run = Path(run_dir)
        if not run.is_dir():
            raise FileNotFoundError(f"run directory {run} does not exist")
        if not ModelDir(run).has_run():
            raise FileNotFoundError(
                f"{run} is not a training run directory: it has neither {ModelDir.METRICS} nor "
                f"{ModelDir.TRAIN_STATE}/"
            )
        return run
    return model_dir if ModelDir(model_dir).has_run() else None


# ---- reading weights without loading them all -----------------------------------------------


class _WeightFiles:
    """The tensors of a model directory's safetensors files, read one at a time on demand,
    with their stored dtypes known without reading any data."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        from moekit.model_dir import weight_files

        self.directory = directory
        self.where: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        for path in weight_files(directory):
            if not path.exists():
                raise FileNotFoundError(f"{path} is listed in the weight index but missing")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        self.where[name] = path
                        self.dtypes[name] = f.get_slice(name).get_dtype()
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"{path} is not a readable safetensors file ({e})") from e

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as f:
            return f.get_tensor(name)


# ---- the routing sample ----------------------------------------------------------------------


@dataclass
class _Sample:
    """What routing a sample of text through the model measured, per MoE layer."""

    tokens: int
    copies: dict[int, list[int]]  # routed copies per expert (before any capacity)
    entropy: dict[int, float]  # mean routing entropy, nats
    logits_dtypes: set[str]
    top_k: int


def _sample_rows(model_dir: Path, vocab_size: int, tokens: int, seq_len: int) -> torch.Tensor:
    """(rows, seq_len) token ids of builtin-corpus text, the four domains in equal parts."""
    import torch

    from moekit.data.corpus import DOMAINS, builtin_corpus
    from moekit.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(model_dir)
    rows = max(1, tokens // seq_len)
    per_domain = math.ceil(rows * seq_len / len(DOMAINS))
    # ~4 characters per token for a small BPE; twice that leaves room for larger vocabularies.
    docs = builtin_corpus(max_chars_per_domain=max(20_000, 8 * per_domain))
    streams: dict[str, list[int]] = {d: [] for d in DOMAINS}
    for doc in docs:
        stream = streams.setdefault(doc.domain, [])
        if len(stream) < per_domain:
            stream.extend(tokenizer.encode(doc.text[: 8 * per_domain]))
            stream.append(tokenizer.eos_id)
    ids = [i for stream in streams.values() for i in stream[:per_domain]]
    if max(ids, default=0) >= vocab_size:
        raise ValueError(
            f"the tokenizer in {model_dir} gives id {max(ids)}, beyond the model's vocabulary "
            f"({vocab_size}): tokenizer.json does not belong to this model"
        )
    rows = max(1, min(rows, len(ids) // seq_len))
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def _measure_routing(
    model_dir: Path, cfg: ModelConfig, *, tokens: int, seq_len: int, device: str | None
) -> _Sample | str:
    """Route the sample through the model with inference routing (dropless, causal); the
    reason it could not when it cannot (no tokenizer, weights that do not load)."""
    import torch

    from moekit.model_dir import load_model
    from moekit.runtime import resolve_device

    device = str(resolve_device(device))
    if not ModelDir(model_dir).tokenizer_path.is_file():
        return f"{model_dir} has no {ModelDir.TOKENIZER} to encode the sample text with"
    seq_len = min(seq_len, cfg.max_seq_len)
    try:
        ids = _sample_rows(model_dir, cfg.vocab_size, tokens, seq_len)
        model = load_model(model_dir, device=device)
    except (ValueError, FileNotFoundError) as e:
        return f"the model could not be run ({e})"
    model.eval()
    copies: dict[int, torch.Tensor] = {}
    entropy: dict[int, float] = {}
    dtypes: set[str] = set()
    with torch.no_grad():
        for batch in ids.split(8):
            out = model(batch.to(device), causal_routing=True, return_routing=True)
            for layer, stats in out.moe_stats.items():
                counts = stats.tokens_per_expert.detach().to("cpu", torch.long)
                copies[layer] = copies[layer] + counts if layer in copies else counts
                entropy[layer] = entropy.get(layer, 0.0) + float(stats.entropy) * batch.numel()
                if stats.routing is not None:
                    dtypes.add(str(stats.routing.logits.dtype).removeprefix("torch."))
    assert cfg.moe is not None
    k = cfg.moe.top_k
    if cfg.moe.router == "expert_choice":  # causal mode: ceil(capacity factor) per token
        k = min(cfg.moe.num_experts, math.ceil(cfg.moe.capacity_factor or 1.0))
    return _Sample(
        tokens=ids.numel(),
        copies={i: c.tolist() for i, c in sorted(copies.items())},
        entropy={i: e / ids.numel() for i, e in sorted(entropy.items())},
        logits_dtypes=dtypes,
        top_k=k,
    )


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.01 or x == 0 else f"{100 * x:.2f}%"


def _sample_words(sample: _Sample) -> str:
    return f"on {sample.tokens:,} tokens of builtin-corpus text"


# ---- 1. dead experts --------------------------------------------------------------------------


def _classify_load(copies: Sequence[int], dead_share: float) -> tuple[list[int], list[int]]:
    """(dead experts, nearly dead experts) of one layer: none, and fewer copies than
    `dead_share` of an even share."""
    even = sum(copies) / max(len(copies), 1)
    dead = [e for e, c in enumerate(copies) if c == 0]
    nearly = [e for e, c in enumerate(copies) if 0 < c < dead_share * even]
    return dead, nearly


def _check_dead_experts(sample: _Sample | str, dead_share: float) -> Check:
    name = "dead_experts"
    if isinstance(sample, str):
        return _unmeasured(name, sample)
    layers: dict[str, Any] = {}
    dead_words, nearly_words = [], []
    lowest: tuple[float, int, int] | None = None
    for layer, copies in sample.copies.items():
        even = sum(copies) / len(copies)
        dead, nearly = _classify_load(copies, dead_share)
        shares = [c / even if even else 0.0 for c in copies]
        layers[str(layer)] = {
            "copies": copies,
            "min_share": min(shares),
            "dead": dead,
            "nearly_dead": nearly,
        }
        low = min(range(len(shares)), key=shares.__getitem__)
        if lowest is None or shares[low] < lowest[0]:
            lowest = (shares[low], layer, low)
        if dead:
            dead_words.append(f"layer {layer}: expert(s) {_ids(dead)} got no token")
        if nearly:
            nearly_words.append(
                f"layer {layer}: "
                + ", ".join(f"expert {e} got {_pct(shares[e])} of an even share" for e in nearly)
            )
    data = {"tokens": sample.tokens, "dead_share": dead_share, "layers": layers}
    where = _sample_words(sample)
    advice = (
        "Dead experts hold parameters that do no work. Train with a load-balancing signal "
        "(model.moe.aux_loss_weight around 0.01, or aux-loss-free balancing with "
        "model.moe.bias_update_rate around 0.001); in a trained model, re-initialise a dead "
        "expert from a live one plus noise and train on, or prune it. A sample that is far "
        "from the training data can starve experts that are fine: try --tokens with more text."
    )
    if dead_words:
        evidence = f"{where}, " + "; ".join(dead_words + nearly_words) + "."
        return Check(name, "problem", evidence, advice, data)
    if nearly_words:
        evidence = f"{where}, " + "; ".join(nearly_words) + f" (below {_pct(dead_share)})."
        return Check(name, "warning", evidence, advice, data)
    assert lowest is not None
    evidence = (
        f"{where}, every expert of the {len(layers)} MoE layer(s) got at least "
        f"{_pct(dead_share)} of an even share (lowest: layer {lowest[1]} expert {lowest[2]} "
        f"with {_pct(lowest[0])})."
    )
    return Check(name, "ok", evidence, "", data)


def _ids(items: Sequence[int]) -> str:
    return ", ".join(str(i) for i in items)


def _unmeasured(name: str, why: str) -> Check:
    if why.startswith("the model is dense"):
        return _not_applicable(name, why)
    return Check(
        name,
        "warning",
        f"routing was not measured: {why}.",
        "Give the model directory its tokenizer.json and weights that load "
        "(moekit.load_model) so the routing checks can run.",
        {"applicable": True, "measured": False},
    )


# ---- 2. load imbalance ------------------------------------------------------------------------


def _check_imbalance(sample: _Sample | str, cfg: ModelConfig, warn: float, problem: float) -> Check:
    name = "load_imbalance"
    if isinstance(sample, str):
        return _unmeasured(name, sample)
    layers: dict[str, Any] = {}
    worst: tuple[float, int, int] = (0.0, -1, -1)
    for layer, copies in sample.copies.items():
        mean = sum(copies) / len(copies)
        ratio = max(copies) / mean if mean else math.inf
        heaviest = max(range(len(copies)), key=copies.__getitem__)
        layers[str(layer)] = {"imbalance": ratio, "heaviest_expert": heaviest}
        if ratio > worst[0]:
            worst = (ratio, layer, heaviest)
    num_experts = len(next(iter(sample.copies.values())))
    most = num_experts / sample.top_k
    data = {
        "tokens": sample.tokens,
        "warning_above": warn,
        "problem_above": problem,
        "most_possible": most,
        "layers": layers,
    }
    ratio, layer, heaviest = worst
    summary = (
        f"{_sample_words(sample)}, max/mean copies per expert is "
        + ", ".join(f"{v['imbalance']:.2f}" for v in layers.values())
        + f" by layer (worst: layer {layer}, expert {heaviest} takes {ratio:.2f}x an even share;"
        f" the most possible with {num_experts} experts and top-{sample.top_k} is {most:.2f})."
    )
    advice = (
        "The busiest expert sets the step time and its capacity drops tokens. Raise "
        "model.moe.aux_loss_weight (or use aux-loss-free balancing, model.moe.bias_update_rate) "
        "and train on; if the sample is unlike the training data, check with more --tokens."
    )
    if ratio > problem:
        return Check(name, "problem", summary, advice, data)
    if ratio > warn:
        return Check(name, "warning", summary, advice, data)
    return Check(name, "ok", summary, "", data)


# ---- 3. router collapse -----------------------------------------------------------------------


def _check_collapse(sample: _Sample | str, threshold: float) -> Check:
    name = "router_collapse"
    if isinstance(sample, str):
        return _unmeasured(name, sample)
    layers: dict[str, Any] = {}
    collapsed = []
    for layer, copies in sample.copies.items():
        num_experts = len(copies)
        if num_experts < 2:
            continue
        normalised = sample.entropy[layer] / math.log(num_experts)
        total = sum(copies) or 1
        busiest = sorted(copies, reverse=True)[: sample.top_k]
        layers[str(layer)] = {
            "entropy_nats": sample.entropy[layer],
            "normalised_entropy": normalised,
            "busiest_share": sum(busiest) / total,
        }
        if normalised < threshold:
            collapsed.append(layer)
    if not layers:
        return _not_applicable(name, "every MoE layer has a single expert")
    data = {"tokens": sample.tokens, "problem_below": threshold, "layers": layers}
    by_layer = ", ".join(f"{v['normalised_entropy']:.2f}" for v in layers.values())
    if collapsed:
        details = "; ".join(
            f"layer {i}: {layers[str(i)]['entropy_nats']:.3f} nats "
            f"({layers[str(i)]['normalised_entropy']:.3f} of log E), the busiest "
            f"{sample.top_k} expert(s) take {_pct(layers[str(i)]['busiest_share'])} of copies"
            for i in collapsed
        )
        evidence = (
            f"{_sample_words(sample)}, the router is near-certain on every token ({details}; "
            f"below {threshold:.2f} of log E counts as collapsed)."
        )
        advice = (
            "A collapsed router gives each token a one-hot distribution: its softmax saturates, "
            "its gradient vanishes and it stops learning. Lower the learning rate, add a router "
            "z-loss (model.moe.z_loss_weight=0.001) and a load-balancing loss, and retrain from "
            "a checkpoint before the collapse; router weights of huge norm are the usual sign."
        )
        return Check(name, "problem", evidence, advice, data)
    evidence = (
        f"{_sample_words(sample)}, mean routing entropy is {by_layer} of log(E) by layer "
        f"(collapse below {threshold:.2f})."
    )
    return Check(name, "ok", evidence, "", data)


# ---- 4. dead experts in the training metrics ----------------------------------------------------


def _check_training_dead(cfg: ModelConfig, run: Path | None, window: int) -> Check:
    name = "training_dead_experts"
    if cfg.moe is None:
        return _not_applicable(name, "the model is dense (no MoE layer)")
    if run is None:
        return _not_applicable(name, "no run directory (pass --run RUN_DIR)")
    records = [
        r
        for r in ModelDir(run).read_metrics()
        if r.get("kind") == "train" and isinstance(r.get("routing"), dict)
    ]
    if not records:
        return _not_applicable(name, f"{run}/metrics.jsonl has no training routing records")
    recent = records[-window:]
    last = recent[-1]
    dead_last = {k: int(v.get("dead") or 0) for k, v in last["routing"].items()}
    persistent = [
        k
        for k, n in dead_last.items()
        if n > 0
        and len(recent) == window
        and all(int((r["routing"].get(k) or {}).get("dead") or 0) > 0 for r in recent)
    ]
    imbalance = {k: v.get("imbalance") for k, v in last["routing"].items()}
    data = {
        "run_dir": str(run),
        "step": last.get("step"),
        "dead": dead_last,
        "imbalance": imbalance,
        "window": window,
        "persistent_layers": persistent,
    }
    steps = f"steps {recent[0].get('step')}..{last.get('step')}"
    advice = (
        "The run is training experts that receive no tokens. Raise model.moe.aux_loss_weight "
        "or turn on aux-loss-free balancing (model.moe.bias_update_rate), then resume; check "
        "the load plots in report/ to see when the experts died."
    )
    dead_words = ", ".join(f"layer {k}: {n}" for k, n in dead_last.items() if n)
    if persistent:
        evidence = (
            f"metrics.jsonl reports dead experts in every one of the last {window} training "
            f"records ({steps}); at step {last.get('step')}: {dead_words}."
        )
        return Check(name, "problem", evidence, advice, data)
    if dead_words:
        evidence = (
            f"metrics.jsonl reports dead experts at step {last.get('step')} ({dead_words}), "
            f"though not in each of the last {window} records ({steps})."
        )
        return Check(name, "warning", evidence, advice, data)
    finite = [float(v) for v in imbalance.values() if isinstance(v, int | float)]
    spread = f"; imbalance {min(finite):.2f} to {max(finite):.2f}" if finite else ""
    evidence = (
        f"metrics.jsonl at step {last.get('step')}: no dead expert in the "
        f"{len(dead_last)} MoE layer(s){spread}."
    )
    return Check(name, "ok", evidence, "", data)


# ---- 5. aux-loss-free selection bias -----------------------------------------------------------


def _bias_name(layer: int) -> str:
    return f"layers.{layer}.ffn.router.selection_bias"


def _moe_layers(cfg: ModelConfig) -> list[int]:
    assert cfg.moe is not None
    return [i for i in range(cfg.num_layers) if cfg.moe.is_moe_layer(i)]


def _frozen_routing_method(run: Path | None) -> str | None:
    """The fine-tuning method of the run in `run` when it keeps the routers frozen (LoRA,
    ESFT), else None."""
    if run is None:
        return None
    try:
        method = (ModelDir(run).finetune_summary() or {}).get("method")
    except (OSError, ValueError):
        return None
    return method if method in ("lora", "esft") else None


def _check_selection_bias(cfg: ModelConfig, weights: _WeightFiles, run: Path | None) -> Check:
    import torch

    name = "selection_bias"
    if cfg.moe is None:
        return _not_applicable(name, "the model is dense (no MoE layer)")
    rate = cfg.moe.bias_update_rate
    if rate <= 0:
        why = "model.moe.bias_update_rate is 0 (no aux-loss-free balancing)"
        if cfg.moe.selection_bias:
            why += "; the model holds a fixed selection bias that training does not update"
        return _not_applicable(name, why)
    layers = _moe_layers(cfg)
    missing = [i for i in layers if _bias_name(i) not in weights]
    advice_missing = (
        "The config asks for aux-loss-free balancing but the weights hold no selection bias: "
        "the weights were written by something that dropped the router buffers. Re-export "
        "them with the buffers (model.state_dict() includes them)."
    )
    if missing:
        evidence = f"bias_update_rate={rate:g} but no selection bias is stored for layer(s) "
        return Check(
            name,
            "problem",
            evidence + f"{_ids(missing)}.",
            advice_missing,
            {"missing_layers": missing},
        )
    biases = {i: weights.get(_bias_name(i)).float() for i in layers}
    zero = [i for i, b in biases.items() if not bool(b.any())]
    data: dict[str, Any] = {
        "bias_update_rate": rate,
        "max_abs_bias": {str(i): float(b.abs().max()) for i, b in biases.items()},
        "zero_layers": zero,
    }
    advice = (
        "Aux-loss-free balancing only works if the trainer updates the bias after each "
        "optimizer step (Transformer.update_router_biases with the step's routed counts). A "
        "bias that never moves means a custom training loop skips that call, or the bias is "
        "not saved with the weights; nothing then balances the load unless the aux loss does."
    )
    problems = []
    if zero:
        problems.append(
            f"the selection bias of layer(s) {_ids(zero)} is all zeros in the model "
            f"(bias_update_rate={rate:g}: training moves it by {rate:g} per step)"
        )
    checkpoints = ModelDir(run).checkpoints()[-2:] if run is not None else []
    frozen_by = _frozen_routing_method(run)
    if frozen_by is not None:
        # LoRA and ESFT fine-tuning freeze the routers, their balancing biases included.
        data["frozen_by_finetune"] = frozen_by
        checkpoints = []
    if len(checkpoints) == 2:
        older, newer = (_WeightFiles(p) for p in checkpoints)
        unchanged, change = [], {}
        for i in layers:
            if _bias_name(i) not in older or _bias_name(i) not in newer:
                continue
            a, b = older.get(_bias_name(i)).float(), newer.get(_bias_name(i)).float()
            change[str(i)] = float((a - b).abs().max())
            if torch.equal(a, b):
                unchanged.append(i)
        data["checkpoints"] = [p.name for p in checkpoints]
        data["max_change"] = change
        if unchanged:
            problems.append(
                f"it is identical in checkpoints {checkpoints[0].name} and {checkpoints[1].name} "
                f"for layer(s) {_ids(unchanged)}"
            )
        compared = (
            f"; it moved by up to {max(change.values()):.3g} between {checkpoints[0].name} "
            f"and {checkpoints[1].name}"
            if change
            else ""
        )
    else:
        compared = "; fewer than two checkpoints in train_state/, so no change was compared"
        if run is None:
            compared = "; no run directory, so no change between checkpoints was compared"
        if frozen_by is not None:
            compared = (
                f"; a {frozen_by} fine-tune keeps the routers and their biases frozen by design, "
                "so checkpoints were not compared"
            )
    if problems:
        return Check(name, "problem", "; ".join(problems) + ".", advice, data)
    largest = max(float(b.abs().max()) for b in biases.values())
    evidence = (
        f"bias_update_rate={rate:g}: the selection bias of every MoE layer is non-zero (largest "
        f"|bias| {largest:.3g}){compared}."
    )
    return Check(name, "ok", evidence, "", data)


# ---- 6. nothing balances the load --------------------------------------------------------------


def _check_load_balancing(cfg: ModelConfig) -> Check:
    name = "load_balancing"
    moe = cfg.moe
    if moe is None:
        return _not_applicable(name, "the model is dense (no MoE layer)")
    data = {
        "router": moe.router,
        "score_func": moe.score_func,
        "aux_loss_weight": moe.aux_loss_weight,
        "bias_update_rate": moe.bias_update_rate,
    }
    if moe.router == "expert_choice":
        return Check(
            name, "ok", "expert-choice routing balances the load by construction.", data=data
        )
    balancers = []
    if moe.aux_loss_weight > 0:
        balancers.append(f"a load-balancing loss (aux_loss_weight={moe.aux_loss_weight:g})")
    if moe.bias_update_rate > 0:
        balancers.append(f"aux-loss-free balancing (bias_update_rate={moe.bias_update_rate:g})")
    if balancers:
        return Check(
            name, "ok", "the load is balanced by " + " and ".join(balancers) + ".", data=data
        )
    evidence = (
        f"model.moe.aux_loss_weight is 0 with a {moe.score_func} {moe.router} router and no "
        "aux-loss-free balancing (bias_update_rate is 0): nothing in training keeps the load "
        "balanced, and token-choice routers then tend to send most tokens to a few experts."
    )
    advice = (
        "Set model.moe.aux_loss_weight (0.01 is the usual value; 0.001 for many experts) or "
        "model.moe.bias_update_rate (e.g. 0.001, DeepSeek-V3's aux-loss-free balancing) before "
        "training or fine-tuning this model."
    )
    return Check(name, "problem", evidence, advice, data)


# ---- 7. fine-tuned weights that never changed ----------------------------------------------------


def _check_adapters(cfg: ModelConfig, model_dir: Path, weights: _WeightFiles) -> Check:
    name = "adapters"
    adapter_dir = ModelDir(model_dir).adapter_dir
    summary = ModelDir(model_dir).finetune_summary() or {}
    if (adapter_dir / ModelDir.ADAPTER_WEIGHTS).is_file():
        return _check_lora(
            cfg, adapter_dir / ModelDir.ADAPTER_WEIGHTS, adapter_dir / ModelDir.ADAPTER_CONFIG
        )
    method = summary.get("method")
    if method in ("esft", "full"):
        return _check_tuned_experts(cfg, model_dir, weights, summary)
    if method == "lora":
        return Check(
            name,
            "problem",
            f"finetune.json says method 'lora' but {adapter_dir} holds no "
            f"{ModelDir.ADAPTER_WEIGHTS}.",
            "Copy the adapter/ folder of the fine-tuning run into this directory, or fine-tune "
            "again: without it the adapters cannot be checked, exported or unmerged.",
            {"method": "lora"},
        )
    return _not_applicable(name, "not a fine-tuned model directory (no adapter/, no finetune.json)")


def _check_lora(cfg: ModelConfig, weights_file: Path, config_file: Path) -> Check:
    """Every adapter's B starts at exactly zero: a B still zero never received an update."""
    from safetensors.torch import load_file

    name = "adapters"
    try:
        state = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{weights_file} is not a readable safetensors file ({e})") from e
    untrained_targets: list[str] = []
    untrained_experts: dict[str, list[int]] = {}
    targets = 0
    expert_targets = 0
    for key in sorted(state):
        if not key.endswith(".B"):
            continue
        prefix = key.removesuffix(".B")
        b = state[key]
        targets += 1
        if b.dim() == 3:  # stacked experts: (E, out, rank), with a mask of adapted experts
            expert_targets += 1
            mask = state.get(f"{prefix}.mask")
            adapted = [e for e in range(b.shape[0]) if mask is None or float(mask[e]) > 0]
            zero = [e for e in adapted if not bool(b[e].any())]
            if not adapted or len(zero) == len(adapted):  # no expert adapted, or none trained
                untrained_targets.append(prefix)
            elif zero:
                untrained_experts[prefix] = zero
        elif not bool(b.any()):
            untrained_targets.append(prefix)
    data: dict[str, Any] = {
        "method": "lora",
        "adapted_weights": targets,
        "expert_adapters": expert_targets,
        "untrained_targets": untrained_targets,
        "untrained_experts": untrained_experts,
    }
    if targets == 0:
        return Check(
            name,
            "problem",
            f"{weights_file} holds no adapter (no '.B' tensor).",
            "Save the adapter again with moekit.finetune.lora.save_adapter.",
            data,
        )
    advice = (
        "LoRA's B starts at exactly zero, so a B that is still zero never received a gradient: "
        "the adapter did nothing. Check that the targeted weights are on the loss path, that "
        "their parameters are in the optimizer, and that the learning rate is not 0; an "
        "expert's B stays zero when no fine-tuning token was routed to it (more or more varied "
        "data, or adapt fewer experts with lora experts=[...])."
    )
    if untrained_targets:
        evidence = (
            f"{len(untrained_targets)} of {targets} adapted weights were never updated (B is "
            f"exactly zero): {', '.join(untrained_targets[:6])}"
            + (" ..." if len(untrained_targets) > 6 else "")
            + "."
        )
        return Check(name, "problem", evidence, advice, data)
    if untrained_experts:
        evidence = (
            "some adapted experts were never updated (their B is exactly zero): "
            + "; ".join(f"{k}: expert(s) {_ids(v)}" for k, v in list(untrained_experts.items())[:6])
            + "."
        )
        return Check(name, "warning", evidence, advice, data)
    if cfg.moe is not None and expert_targets == 0:
        lora_targets: Any = None
        if config_file.is_file():
            lora_targets = json.loads(config_file.read_text()).get("lora", {}).get("targets")
        data["lora_targets"] = lora_targets
        evidence = (
            f"all {targets} adapted weights were updated, but no adapter touches the routed "
            f"experts (targets {lora_targets}): LoRA left the expert weights frozen."
        )
        advice = (
            "If you meant to adapt the experts, include '*.ffn.experts.*' in the LoRA targets "
            "(the default does); adapters that only wrap nn.Linear layers miss stacked experts."
        )
        return Check(name, "warning", evidence, advice, data)
    evidence = (
        f"all {targets} adapted weights ({expert_targets} of them over stacked experts) were "
        "updated: no adapter's B is still zero (masked experts excepted)."
    )
    return Check(name, "ok", evidence, "", data)


def _find_base(model_dir: Path, base: str) -> Path | None:
    for candidate in (Path(base), model_dir / base, model_dir.parent / base):
        if ModelDir(candidate).is_model():
            return candidate
    return None


def _check_tuned_experts(
    cfg: ModelConfig, model_dir: Path, weights: _WeightFiles, summary: dict[str, Any]
) -> Check:
    """ESFT and full fine-tuning: each expert that was to train must differ from the base."""
    import torch

    name = "adapters"
    method = summary["method"]
    base_name = str(summary.get("base") or "")
    if cfg.moe is None:
        return _not_applicable(name, f"a {method} fine-tune of a dense model has no experts")
    base_dir = _find_base(model_dir, base_name) if base_name else None
    if base_dir is None:
        return _not_applicable(
            name, f"{method} fine-tune whose base model directory {base_name!r} is not here"
        )
    base = _WeightFiles(base_dir)
    layers = _moe_layers(cfg)
    if method == "esft":
        chosen = {int(k): list(v) for k, v in (summary.get("esft_experts") or {}).items()}
    else:
        chosen = {i: list(range(cfg.moe.num_experts)) for i in layers}
    unchanged: dict[str, list[int]] = {}
    leaked: dict[str, list[int]] = {}
    for i in layers:
        names = [f"layers.{i}.ffn.experts.{p}" for p in _PROJECTIONS]
        names = [n for n in names if n in weights and n in base]
        if not names:
            continue
        same = [True] * cfg.moe.num_experts
        for n in names:
            ours, theirs = weights.get(n), base.get(n)
            if ours.shape != theirs.shape:
                return Check(
                    name,
                    "warning",
                    f"{n} has shape {tuple(ours.shape)} here but {tuple(theirs.shape)} in the "
                    f"base {base_dir}: finetune.json names another model as base.",
                    "Point finetune.json's base at the model this one was tuned from.",
                    {"method": method, "base": str(base_dir)},
                )
            for e in range(ours.shape[0]):
                same[e] = same[e] and torch.equal(ours[e], theirs[e])
        picked = set(chosen.get(i, []))
        if untouched := [e for e in sorted(picked) if e < len(same) and same[e]]:
            unchanged[str(i)] = untouched
        if method == "esft" and (
            moved := [e for e in range(len(same)) if e not in picked and not same[e]]
        ):
            leaked[str(i)] = moved
    data = {
        "method": method,
        "base": str(base_dir),
        "trained_experts": {str(k): v for k, v in chosen.items()},
        "unchanged": unchanged,
        "frozen_but_changed": leaked,
    }
    what = "chosen (ESFT)" if method == "esft" else "trained"
    if unchanged:
        evidence = (
            f"{what} experts are bitwise identical to the base {base_dir}: "
            + "; ".join(f"layer {k}: expert(s) {_ids(v)}" for k, v in unchanged.items())
            + "."
        )
        advice = (
            "These experts never received an update: check that their gradients are not masked "
            "(ESFT's selection in finetune.json), that they are in the optimizer, and that the "
            "fine-tuning data reaches them (no routed token, no gradient)."
        )
        return Check(name, "problem", evidence, advice, data)
    if leaked:
        evidence = (
            "experts that ESFT was to keep frozen differ from the base: "
            + "; ".join(f"layer {k}: expert(s) {_ids(v)}" for k, v in leaked.items())
            + "."
        )
        advice = (
            "ESFT restores frozen experts after every optimizer step; a custom loop that "
            "skips ExpertFreeze.attach(optimizer) lets weight decay move them."
        )
        return Check(name, "warning", evidence, advice, data)
    count = sum(len(v) for v in chosen.values())
    evidence = (
        f"{method} fine-tune: all {count} {what} expert(s) differ from the base {base_dir}"
        + (", and every frozen expert is unchanged." if method == "esft" else ".")
    )
    return Check(name, "ok", evidence, "", data)


# ---- 8. experts that are copies, or zeros -------------------------------------------------------


def _digest(t: torch.Tensor) -> str:
    """A hash of the tensor's bytes: equal digests mean bitwise-equal experts."""
    import torch

    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _check_expert_copies(cfg: ModelConfig, weights: _WeightFiles) -> Check:
    name = "expert_copies"
    if cfg.moe is None:
        return _not_applicable(name, "the model is dense (no MoE layer)")
    zero: dict[str, dict[int, list[str]]] = {}
    copies: dict[str, list[list[int]]] = {}
    checked = 0
    for i in _moe_layers(cfg):
        stacks = {p: f"layers.{i}.ffn.experts.{p}" for p in _PROJECTIONS}
        stacks = {p: n for p, n in stacks.items() if n in weights}
        if not stacks:
            continue
        checked += 1
        num_experts = cfg.moe.num_experts
        keys: list[list[str]] = [[] for _ in range(num_experts)]
        for proj, tensor_name in stacks.items():
            stacked = weights.get(tensor_name)
            for e in range(min(num_experts, stacked.shape[0])):
                if not bool(stacked[e].any()):
                    zero.setdefault(str(i), {}).setdefault(e, []).append(proj)
                keys[e].append(_digest(stacked[e]))
        groups: dict[tuple[str, ...], list[int]] = {}
        for e, k in enumerate(keys):
            if e not in zero.get(str(i), {}):
                groups.setdefault(tuple(k), []).append(e)
        if dup := [g for g in groups.values() if len(g) > 1]:
            copies[str(i)] = dup
    if checked == 0:
        return Check(
            name,
            "problem",
            "no stacked expert weights (layers.N.ffn.experts.w_up ...) are stored for any MoE "
            "layer.",
            "The weights lack the experts entirely: convert the checkpoint again.",
            {"layers_checked": 0},
        )
    data = {
        "layers_checked": checked,
        "zero": {k: {str(e): p for e, p in v.items()} for k, v in zero.items()},
        "copies": copies,
    }
    if zero:
        evidence = (
            "experts whose weights are all zeros: "
            + "; ".join(
                f"layer {k}: " + ", ".join(f"expert {e} ({'/'.join(p)})" for e, p in v.items())
                for k, v in zero.items()
            )
            + "."
        )
        advice = (
            "An all-zero expert computes nothing: a conversion dropped it (a key-name mismatch "
            "leaves the freshly zeroed tensor in place). Convert the checkpoint again and check "
            "every expert's key maps to the source."
        )
        if copies:
            evidence += " Also identical experts: " + _copies_words(copies) + "."
        return Check(name, "problem", evidence, advice, data)
    if copies:
        evidence = "experts that are exact copies of each other: " + _copies_words(copies) + "."
        advice = (
            "Identical experts receive the same gradient from the same tokens and may never "
            "diverge: upcycling without symmetry breaking (moekit upcycle --noise 0.01) or a "
            "conversion that wrote one expert into several slots. Add noise or convert again."
        )
        return Check(name, "warning", evidence, advice, data)
    evidence = (
        f"the experts of all {checked} MoE layer(s) are pairwise distinct and none is all zeros."
    )
    return Check(name, "ok", evidence, "", data)


def _copies_words(copies: dict[str, list[list[int]]]) -> str:
    return "; ".join(
        f"layer {k}: " + ", ".join("experts " + " = ".join(map(str, g)) for g in v)
        for k, v in copies.items()
    )


# ---- 9. routers in low precision ---------------------------------------------------------------


def _check_router_precision(
    cfg: ModelConfig, weights: _WeightFiles, sample: _Sample | str
) -> Check:
    name = "router_precision"
    if cfg.moe is None:
        return _not_applicable(name, "the model is dense (no MoE layer)")
    router_names = [
        n
        for n in weights.dtypes
        if n.endswith((".ffn.router.weight", ".ffn.router.selection_bias"))
    ]
    low = {
        n: weights.dtypes[n]
        for n in sorted(router_names)
        if weights.dtypes[n] not in _FLOAT32_NAMES
    }
    logits = sorted(sample.logits_dtypes) if isinstance(sample, _Sample) else []
    low_logits = [d for d in logits if d not in ("float32", "float64")]
    data = {
        "router_tensors": len(router_names),
        "low_precision": low,
        "logits_dtypes": logits,
    }
    advice = (
        "Routing decides by small score differences: a bf16 router weight keeps ~3 significant "
        "digits, so top-k choices flip and small training updates round away. moekit computes "
        "routing in float32 from float32 weights; keep the router weights and selection biases "
        "float32 in the checkpoint (moekit convert and cast_model do; re-export with them in "
        "float32, or from the float32 source)."
    )
    if low or low_logits:
        parts = []
        if low:
            kinds = sorted(set(low.values()))
            shown = ", ".join(f"{n} ({d})" for n, d in list(low.items())[:4])
            parts.append(
                f"{len(low)} of {len(router_names)} router tensors are stored in "
                f"{'/'.join(kinds)}: {shown}" + (" ..." if len(low) > 4 else "")
            )
        if low_logits:
            parts.append(f"router logits were computed in {', '.join(low_logits)} on the sample")
        return Check(name, "problem", "; ".join(parts) + ".", advice, data)
    if not router_names:
        return Check(
            name,
            "problem",
            "no router weight (layers.N.ffn.router.weight) is stored.",
            "The weights lack the routers: convert the checkpoint again.",
            data,
        )
    measured = f"; router logits computed in {', '.join(logits)} on the sample" if logits else ""
    evidence = f"all {len(router_names)} router tensors are stored in float32{measured}."
    return Check(name, "ok", evidence, "", data)
