"""The training report written into MODEL_DIR/report/ at the end of a run.

- loss.png: training loss and validation loss against tokens, and validation loss per domain
- expert_load.png: share of routed token copies per expert and MoE layer, measured on the
  validation set (a heatmap: an even spread is healthy, a bright column a hot expert, a dark
  one a dead expert)
- samples.json: greedy continuations of a few prompts
- summary.json: the figures below as one JSON object
- report.html: all of it in one self-contained page (images embedded, no network needed)
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moekit.data.loader import iter_eval_batches
from moekit.files import atomic_write_text
from moekit.infer.generate import greedy_generate
from moekit.model_dir import ModelDir
from moekit.params import count_params
from moekit.report import plots

if TYPE_CHECKING:
    from moekit.training.trainer import Trainer, TrainResult


@torch.no_grad()
def expert_load(trainer: Trainer) -> dict[int, list[float]]:
    """Share of routed copies per expert for each MoE layer over (part of) the validation set."""
    model, tc = trainer.model, trainer.cfg.train
    model.eval()
    counts: dict[int, torch.Tensor] = {}
    rows = trainer.val_rows if len(trainer.val_rows) else trainer.data.train
    for i, (inputs, _) in enumerate(iter_eval_batches(rows, tc.batch_size)):
        if i >= tc.eval_batches:
            break
        out = model(inputs.to(trainer.device), causal_routing=True)
        for layer, stats in out.moe_stats.items():
            c = stats.tokens_per_expert.cpu().double()
            counts[layer] = counts[layer] + c if layer in counts else c
    model.train()
    return {layer: (c / c.sum().clamp_min(1)).tolist() for layer, c in sorted(counts.items())}


def samples(trainer: Trainer) -> list[dict[str, str]]:
    tc, tok = trainer.cfg.train, trainer.tokenizer
    out = []
    for prompt in trainer.sample_prompts:
        ids = greedy_generate(
            trainer.model, tok.encode_prompt(prompt), tc.sample_tokens, eos_id=tok.eos_id
        )
        out.append({"prompt": prompt, "completion": tok.decode(ids)})
    return out


def write_training_report(trainer: Trainer, result: TrainResult) -> Path:
    """Write report/ into the run directory and return its path."""
    out = ModelDir(trainer.run_dir).report_dir
    out.mkdir(exist_ok=True)
    records = ModelDir(trainer.run_dir).read_metrics()
    plots.loss_curves(records, out / "loss.png")
    load = expert_load(trainer)
    if load:
        plots.expert_load(load, out / "expert_load.png")
    generated = samples(trainer)
    atomic_write_text(out / "samples.json", json.dumps(generated, indent=2) + "\n")
    cfg = trainer.cfg.model
    summary: dict[str, Any] = {
        "steps": result.step,
        "tokens": result.tokens,
        "train_seconds": result.seconds,
        "val_loss": result.val_loss,
        "val_by_domain": result.val_by_domain,
        "total_params": count_params(cfg).total,
        "active_params": count_params(cfg).active,
        "skipped_steps": result.skipped_steps,
        "expert_load": {str(k): v for k, v in load.items()},
        "data": trainer.data.stats,
    }
    method = trainer.method_line()
    if method is not None:
        summary["finetune"] = method
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.html", _html(trainer, summary, generated, out))
    return out


def _img(path: Path) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{path.stem}">'


def _html(
    trainer: Trainer, summary: dict[str, Any], generated: list[dict[str, str]], out: Path
) -> str:
    esc = html.escape
    domains = "".join(
        f"<tr><td>{esc(d)}</td><td>{v:.4f}</td></tr>" for d, v in summary["val_by_domain"].items()
    )
    sample_rows = "".join(
        f"<tr><td><code>{esc(s['prompt'])}</code></td><td><pre>{esc(s['completion'])}</pre></td></tr>"
        for s in generated
    )
    val = summary["val_loss"]
    tuned = (
        f"<tr><th>fine-tuning</th><td>{esc(summary['finetune'])}</td></tr>"
        if "finetune" in summary
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moekit training report</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 4px 12px; border-bottom: 1px solid #eee;
text-align: left; vertical-align: top; }} img {{ max-width: 100%; }}
pre {{ margin: 0; white-space: pre-wrap; font-size: 13px; }}
</style></head><body>
<h1>Training report: {esc(str(trainer.run_dir))}</h1>
<table>
<tr><th>parameters (total / active per token)</th><td>{summary["total_params"]:,} /
{summary["active_params"]:,}</td></tr>
<tr><th>steps, tokens, seconds</th><td>{summary["steps"]:,}, {summary["tokens"]:,},
{summary["train_seconds"]:.0f}</td></tr>
<tr><th>final validation loss</th><td>{"n/a" if val is None else f"{val:.4f}"}</td></tr>
<tr><th>skipped non-finite steps</th><td>{summary["skipped_steps"]}</td></tr>
{tuned}</table>
<h2>Loss</h2>{_img(out / "loss.png")}
<table><tr><th>domain</th><th>validation loss</th></tr>{domains}</table>
<h2>Expert load</h2>{_img(out / "expert_load.png") or "<p>dense model: no experts</p>"}
<h2>Samples (greedy)</h2><table>{sample_rows}</table>
</body></html>
"""
