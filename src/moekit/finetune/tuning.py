"""What the trainer does differently when it fine-tunes (`RunConfig.finetune`).

The trainer keeps its loop, progress, metrics, checkpoints and resume; this class supplies the
fine-tuning data (moekit.finetune.sft), starts the model from the base weights, applies the
method (LoRA adapters, expert-specialised freezing, or nothing for full fine-tuning), and
writes what a fine-tuned model directory needs: for LoRA the merged weights (so generate and
serve work on the directory as on any model) plus the adapter alone in adapter/, the chat
template, and finetune.json (method, trainable parameters, chosen experts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moekit.config import ModelConfig
from moekit.data.loader import TokenizedData, iter_eval_batches
from moekit.data.tokenizer import Tokenizer
from moekit.files import atomic_write_text
from moekit.finetune.config import FinetuneConfig
from moekit.finetune.esft import ExpertFreeze, routing_mass, select_experts
from moekit.finetune.lora import AdapterSummary, apply_lora, merged_state, save_adapter
from moekit.finetune.sft import Example, prepare_sft
from moekit.infer.chat import TEMPLATE_FILE, ChatTemplate
from moekit.model import Transformer
from moekit.model_dir import ModelDir, load_state_checked, load_weights, save_model, save_weights

SUMMARY_FILE = ModelDir.FINETUNE
ADAPTER_DIR = ModelDir.ADAPTER
ESFT_SAMPLE_BATCHES = 32


class FineTuning:
    def __init__(self, cfg: FinetuneConfig, run_dir: Path, *, resume: bool) -> None:
        self.cfg, self.run_dir, self.resume = cfg, run_dir, resume
        self.base = Path(cfg.base)
        ModelDir(self.base).require_model("finetune.base")
        self.template = ChatTemplate.load(self.base)
        self.val_examples: list[Example] = []
        self.summary: AdapterSummary | None = None
        self.selection: dict[int, list[int]] = {}
        self.freeze: ExpertFreeze | None = None

    # ---- data ---------------------------------------------------------------------------
    def prepare_data(
        self, seq_len: int, seed: int, model_cfg: ModelConfig
    ) -> tuple[Tokenizer, TokenizedData]:
        tokenizer = Tokenizer.load(self.base)
        self.pad_id = tokenizer.pad_id
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(
                f"{self.base}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                f"{model_cfg.vocab_size}"
            )
        data, self.val_examples = prepare_sft(
            self.cfg.data,
            tokenizer,
            seq_len,
            template=self.template,
            val_fraction=self.cfg.val_fraction,
            seed=seed,
        )
        return tokenizer, data

    def data_line(self, data: TokenizedData) -> str:
        s = data.stats
        return (
            f"fine-tuning data: {s['train_examples']} training and {s['val_examples']} validation "
            f"examples in rows of {s['row_tokens']} tokens, {s['target_tokens']:,} target tokens"
            + (
                f" ({s['skipped_too_long']} without a target token after cutting)"
                if s["skipped_too_long"]
                else ""
            )
        )

    def sample_prompts(self) -> list[str]:
        return [e.prompt() for e in self.val_examples[:4] if e.prompt()]

    # ---- the model ----------------------------------------------------------------------
    def prepare_model(self, model: Transformer, data: TokenizedData, batch_size: int) -> None:
        """Load the base weights, then apply the method."""
        load_state_checked(
            model, load_weights(self.base, next(model.parameters()).device), str(self.base)
        )
        method = self.cfg.method
        if method == "lora":
            self.summary = apply_lora(model, self.cfg.lora)
        elif method == "esft":
            self.selection = self._esft_selection(model, data, batch_size)
            self.freeze = ExpertFreeze(model, self.selection, attention=self.cfg.esft_attention)
            self.summary = self._esft_counts(model)
        else:
            total = sum(p.numel() for p in model.parameters())
            self.summary = AdapterSummary(["all"], total, total)

    def _esft_counts(self, model: Transformer) -> AdapterSummary:
        """Trainable parameters under ESFT: the chosen experts' slices (a stacked weight trains
        only in part) plus attention when it trains."""
        layers = model.moe_layers()
        trainable = sum(
            len(experts) * sum(
                w[0].numel() for w in (layers[i].experts.w_gate, layers[i].experts.w_up,
                                       layers[i].experts.w_down) if w is not None
            )
            for i, experts in self.selection.items()
        )  # fmt: skip
        if self.cfg.esft_attention:
            trainable += sum(p.numel() for b in model.blocks() for p in b.attn.parameters())
        targets = [f"layers.{i}.ffn.experts{e}" for i, e in self.selection.items()]
        return AdapterSummary(targets, trainable, sum(p.numel() for p in model.parameters()))

    def _esft_selection(
        self, model: Transformer, data: TokenizedData, batch_size: int
    ) -> dict[int, list[int]]:
        saved = self.run_dir / SUMMARY_FILE
        if self.resume and saved.is_file():
            summary = json.loads(saved.read_text())
            share = summary.get("esft_routing_share")
            if share is not None:
                self.mass = {int(k): v for k, v in share.items()}
            return {int(k): v for k, v in summary.get("esft_experts", {}).items()}
        if not model.moe_layers():
            raise ValueError("finetune.method='esft' needs an MoE model")
        device = next(model.parameters()).device
        batches = (
            (inputs.to(device), (inputs != self.pad_id).to(device))
            for _, (inputs, _targets) in zip(
                range(ESFT_SAMPLE_BATCHES),
                iter_eval_batches(data.train, batch_size, data.train_mask),
                strict=False,
            )
        )
        mass = routing_mass(model, batches)
        selection = select_experts(mass, self.cfg.esft_coverage)
        # Each chosen expert's share is recorded for the report.
        self.mass = {layer: (m / m.sum().clamp_min(1e-12)).tolist() for layer, m in mass.items()}
        return selection

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        if self.freeze is not None:
            self.freeze.attach(optimizer)

    def summary_line(self) -> str:
        assert self.summary is not None
        s = self.summary
        line = (
            f"{self.cfg.method}: {s.trainable:,} trainable of {s.total:,} parameters "
            f"({s.fraction:.2%})"
        )
        if self.cfg.method == "lora":
            line += f" in {len(s.targets)} adapted weights"
        if self.selection:
            chosen = ", ".join(f"layer {k}: {v}" for k, v in self.selection.items())
            line += f"; experts trained: {chosen}"
        return line

    # ---- files --------------------------------------------------------------------------
    def write_files(self) -> None:
        assert self.summary is not None
        s = self.summary
        info: dict[str, Any] = {
            "method": self.cfg.method,
            "base": str(self.base),
            "trainable_params": s.trainable,
            "total_params": s.total,
            "trainable_fraction": s.fraction,
            "targets": s.targets,
        }
        if self.selection:
            info["esft_coverage"] = self.cfg.esft_coverage
            info["esft_experts"] = {str(k): v for k, v in self.selection.items()}
            if hasattr(self, "mass"):
                info["esft_routing_share"] = {str(k): v for k, v in self.mass.items()}
        atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(info, indent=2) + "\n")
        atomic_write_text(self.run_dir / TEMPLATE_FILE, self.template.to_json())

    def save(self, model: Transformer, model_cfg: ModelConfig) -> None:
        """The run directory's model: merged weights plus the adapter alone for LoRA."""
        if self.cfg.method != "lora":
            save_model(model, model_cfg, self.run_dir)
            return
        from moekit.version import __version__

        save_weights(merged_state(model), self.run_dir, metadata={"moekit_version": __version__})
        ModelDir(self.run_dir).save_config(model_cfg)
        save_adapter(model, self.cfg.lora, self.run_dir / ADAPTER_DIR, base=str(self.base))
