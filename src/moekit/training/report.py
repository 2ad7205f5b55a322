"""The training report written into MODEL_DIR/report/ at the end of a run.

- loss.png: training loss and validation loss against tokens, and validation loss per domain
- expert_load.png: share of routed token copies per expert and MoE layer, measured on the
  validation set (a heatmap: an even spread is healthy, a bright column a hot expert, a dark
  one a dead expert)
- samples.json: greedy continuations of a few prompts
- summary.json: the figures below as one JSON object
- report.html: all of it in one self-contained page (images embedded, no network needed)

The report reads the trainer through `ReportTrainer` and the run's outcome through
`ReportResult`, two protocols of exactly what it uses, so it does not depend on the trainer
module (which calls it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from moekit.analysis.routing import NEARLY_DEAD_FRACTION, LoadStats, trace_routing
from moekit.files import atomic_write_text
from moekit.infer.generate import greedy_generate
from moekit.model_dir import ModelDir
from moekit.params import count_params
from moekit.report import plots
from moekit.report.page import png_data_uri, render

if TYPE_CHECKING:
    from torch import Tensor

    from moekit.data.tokenizer import Tokenizer
    from moekit.model import Transformer
    from moekit.training.config import RunConfig


class ReportData(Protocol):
    """The prepared data, as the report reads it."""

    @property
    def stats(self) -> dict[str, Any]:
        """JSON-serialisable counts of the data (documents, tokens, rows)."""
        ...

    @property
    def train(self) -> Tensor:
        """(N, seq_len + 1) packed training rows."""
        ...


class ReportTrainer(Protocol):
    """What `write_training_report` reads of a trainer, and nothing more."""

    @property
    def run_dir(self) -> Path: ...

    @property
    def model(self) -> Transformer: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def cfg(self) -> RunConfig: ...

    @property
    def val_rows(self) -> Tensor:
        """(N, seq_len + 1) validation rows (in a fixed shuffled order)."""
        ...

    @property
    def data(self) -> ReportData: ...

    @property
    def sample_prompts(self) -> list[str]: ...

    def method_line(self) -> str | None:
        """How the model was fine-tuned, or None for pre-training."""
        ...


class ReportResult(Protocol):
    """What `write_training_report` reads of a run's result (`TrainResult`)."""

    @property
    def step(self) -> int: ...

    @property
    def tokens(self) -> int: ...

    @property
    def seconds(self) -> float: ...

    @property
    def val_loss(self) -> float | None: ...

    @property
    def val_by_domain(self) -> dict[str, float]: ...

    @property
    def skipped_steps(self) -> int: ...


@torch.no_grad()
def expert_load(trainer: ReportTrainer) -> dict[int, LoadStats]:
    """Routing health of each MoE layer over (part of) the validation set: the first
    `train.eval_batches` batches of validation rows (training rows when there are none),
    recorded with inference routing (`moekit.analysis.routing.trace_routing`)."""
    model, tc = trainer.model, trainer.cfg.train
    if not model.moe_layers():
        return {}
    rows = trainer.val_rows if len(trainer.val_rows) else trainer.data.train
    inputs = rows[: tc.eval_batches * tc.batch_size, :-1]
    was_training = model.training
    trace = trace_routing(
        model, inputs.reshape(-1), seq_len=inputs.shape[1], batch_size=tc.batch_size
    )
    model.train(was_training)
    return {layer: trace.load(layer) for layer in sorted(trace.layers)}


def samples(trainer: ReportTrainer) -> list[dict[str, str]]:
    """Greedy continuations of the trainer's sample prompts: [{prompt, completion}]."""
    tc, tok = trainer.cfg.train, trainer.tokenizer
    out = []
    for prompt in trainer.sample_prompts:
        ids = greedy_generate(
            trainer.model, tok.encode_prompt(prompt), tc.sample_tokens, eos_id=tok.eos_id
        )
        out.append({"prompt": prompt, "completion": tok.decode(ids)})
    return out


def write_training_report(trainer: ReportTrainer, result: ReportResult) -> Path:
    """Write report/ into the run directory and return its path."""
    out = ModelDir(trainer.run_dir).report_dir
    out.mkdir(exist_ok=True)
    records = ModelDir(trainer.run_dir).read_metrics()
    plots.loss_curves(records, out / "loss.png")
    load = expert_load(trainer)
    if load:
        plots.expert_load({k: v.share for k, v in load.items()}, out / "expert_load.png")
    generated = samples(trainer)
    atomic_write_text(out / "samples.json", json.dumps(generated, indent=2) + "\n")
    summary = _summary(trainer, result, load)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    page = render(
        "training.html.j2",
        run_dir=str(trainer.run_dir),
        summary=summary,
        health=summary["expert_health"],
        nearly_dead_fraction=NEARLY_DEAD_FRACTION,
        samples=generated,
        loss_png=png_data_uri(out / "loss.png"),
        load_png=png_data_uri(out / "expert_load.png") if load else None,
    )
    atomic_write_text(out / "report.html", page)
    return out


def _summary(
    trainer: ReportTrainer, result: ReportResult, load: dict[int, LoadStats]
) -> dict[str, Any]:
    params = count_params(trainer.model.cfg)
    summary: dict[str, Any] = {
        "steps": result.step,
        "tokens": result.tokens,
        "train_seconds": result.seconds,
        "val_loss": result.val_loss,
        "val_by_domain": result.val_by_domain,
        "total_params": params.total,
        "active_params": params.active,
        "skipped_steps": result.skipped_steps,
        "expert_load": {str(k): v.share for k, v in load.items()},
        "expert_health": {
            str(k): {"imbalance": v.imbalance, "dead": v.dead, "nearly_dead": v.nearly_dead}
            for k, v in load.items()
        },
        "data": trainer.data.stats,
    }
    method = trainer.method_line()
    if method is not None:
        summary["finetune"] = method
    return summary
