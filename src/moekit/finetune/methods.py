"""The fine-tuning methods: LoRA, full fine-tuning and expert-specialised fine-tuning (ESFT).

Each is a training method the trainer drives (the `TrainingMethod` interface of
moekit.training.method; this module matches it by shape and does not import the trainer).
What they share: the data are supervised examples (moekit.finetune.sft) laid out with the base
model's chat template; the model starts from the base weights; the run directory gets the
chat template and finetune.json (method, trainable parameters, chosen experts). What each adds:

- LoRA trains low-rank adapters only, freezes the routers' balancing biases, and saves the
  merged weights (so generate and serve work on the directory as on any model) plus the
  adapter alone in adapter/;
- full fine-tuning trains every weight, the routers' balancing biases included;
- ESFT measures which experts the data routes to, trains only those (and attention with
  `esft_attention`) and records the choice, which a resumed run reads back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from moekit.config import ModelConfig
from moekit.data.loader import TokenizedData
from moekit.data.tokenizer import Tokenizer
from moekit.files import atomic_write_text
from moekit.finetune.config import FinetuneConfig
from moekit.finetune.esft import ExpertFreeze, data_routing_share, select_experts, trainable_params
from moekit.finetune.lora import AdapterSummary, apply_lora, merged_state, save_adapter
from moekit.finetune.sft import Example, prepare_sft
from moekit.infer.chat import TEMPLATE_FILE, ChatTemplate
from moekit.model import Transformer
from moekit.model_dir import FinetuneSummary, ModelDir, load_state_checked, load_weights


class FineTuning:
    """What every fine-tuning method does; a subclass says what it trains (`adapt`).

    `cfg` is the run's finetune section; `model` its model section (the base model's);
    `seq_len`, `seed` and `batch_size` the run's train settings of those names. With `resume`,
    the run in `run_dir` continues and the method reads back what it chose when it started.
    """

    name: ClassVar[str]
    # Methods that freeze the routers (LoRA, ESFT) freeze their aux-loss-free biases too.
    balance_routers: ClassVar[bool] = False

    def __init__(
        self,
        cfg: FinetuneConfig,
        run_dir: Path,
        *,
        resume: bool,
        model: ModelConfig,
        seq_len: int,
        seed: int,
        batch_size: int,
    ) -> None:
        self.cfg, self.run_dir, self.resume = cfg, run_dir, resume
        self.model_cfg, self.seq_len, self.seed, self.batch_size = model, seq_len, seed, batch_size
        self.base = Path(cfg.base)
        ModelDir(self.base).require_model("finetune.base")
        self.template = ChatTemplate.load(self.base)
        self.pad_id: int | None = None
        self.val_examples: list[Example] = []
        self.summary: AdapterSummary | None = None

    # ---- data ---------------------------------------------------------------------------
    def prepare_data(self, say: Callable[[str], None]) -> tuple[Tokenizer, TokenizedData]:
        """The base model's tokenizer and the examples as rows (one example per row, padded:
        the tokenizer's pad id marks the padding)."""
        tokenizer = Tokenizer.load(self.base)
        self.pad_id = tokenizer.pad_id
        if tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise ValueError(
                f"{self.base}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                f"{self.model_cfg.vocab_size}"
            )
        data, self.val_examples = prepare_sft(
            self.cfg.data,
            tokenizer,
            self.seq_len,
            template=self.template,
            val_fraction=self.cfg.val_fraction,
            seed=self.seed,
            model=self.model_cfg,
        )
        say(_data_line(data))
        return tokenizer, data

    def sample_prompts(self) -> list[str]:
        """The prompts of the first validation examples, for the report's samples."""
        return [e.prompt() for e in self.val_examples[:4] if e.prompt()]

    # ---- the model ----------------------------------------------------------------------
    def prepare_model(self, model: Transformer, data: TokenizedData) -> None:
        """Load the base weights, then apply the method."""
        if (q := ModelDir(self.base).config().quantization) is not None:
            raise ValueError(
                f"{self.base} is quantised ({q.bits} bits): fine-tuning needs float weights; "
                "fine-tune its float original, then quantise the result"
            )
        load_state_checked(
            model, load_weights(self.base, next(model.parameters()).device), str(self.base)
        )
        self.summary = self.adapt(model, data)

    def adapt(self, model: Transformer, data: TokenizedData) -> AdapterSummary:
        """Make the base model trainable the method's way; what trains, counted."""
        raise NotImplementedError

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do around the optimizer's steps unless a method says so."""

    def summary_line(self) -> str:
        """E.g. `lora: 16,384 trainable of 82,336 parameters (19.90%) in 14 adapted weights`."""
        s = self._summary()
        return (
            f"{self.name}: {s.trainable:,} trainable of {s.total:,} parameters "
            f"({s.fraction:.2%})" + self._summary_detail()
        )

    def _summary_detail(self) -> str:
        return ""

    def _summary(self) -> AdapterSummary:
        if self.summary is None:
            raise RuntimeError(f"{type(self).__name__}.prepare_model() has not run")
        return self.summary

    # ---- files --------------------------------------------------------------------------
    def save(self, model: Transformer) -> None:
        """The run directory's model: config and weights."""
        ModelDir(self.run_dir).save_model(model, self.model_cfg)

    def finetune_summary(self) -> FinetuneSummary:
        """What finetune.json records of this run."""
        s = self._summary()
        return FinetuneSummary(
            method=self.name,
            base=str(self.base),
            trainable_params=s.trainable,
            total_params=s.total,
            trainable_fraction=s.fraction,
            targets=s.targets,
        )

    def write_files(self) -> None:
        """finetune.json and the chat template the data was laid out with."""
        ModelDir(self.run_dir).write_finetune_summary(self.finetune_summary())
        atomic_write_text(self.run_dir / TEMPLATE_FILE, self.template.to_json())


class LoRATuning(FineTuning):
    """Low-rank adapters on the `finetune.lora` targets; every base weight frozen."""

    name = "lora"

    def adapt(self, model: Transformer, data: TokenizedData) -> AdapterSummary:
        return apply_lora(model, self.cfg.lora)

    def _summary_detail(self) -> str:
        return f" in {len(self._summary().targets)} adapted weights"

    def save(self, model: Transformer) -> None:
        """The base weights with the adapters merged in, and the adapter alone in adapter/."""
        directory = ModelDir(self.run_dir)
        directory.save_weights(merged_state(model))
        directory.save_config(self.model_cfg)
        save_adapter(model, self.cfg.lora, directory.adapter_dir, base=str(self.base))


class FullTuning(FineTuning):
    """Every weight trains, and the routers keep balancing."""

    name = "full"
    balance_routers = True

    def adapt(self, model: Transformer, data: TokenizedData) -> AdapterSummary:
        total = sum(p.numel() for p in model.parameters())
        return AdapterSummary(["all"], total, total)


class ESFTTuning(FineTuning):
    """Only the experts that receive most of the data's routing weight train (per layer the
    fewest covering `esft_coverage` of it), plus attention with `esft_attention`."""

    name = "esft"

    def __init__(self, cfg: FinetuneConfig, run_dir: Path, **kwargs: Any) -> None:
        super().__init__(cfg, run_dir, **kwargs)
        self.selection: dict[int, list[int]] = {}
        self.share: dict[int, list[float]] | None = None  # each expert's share, per layer
        self.freeze: ExpertFreeze | None = None

    def adapt(self, model: Transformer, data: TokenizedData) -> AdapterSummary:
        saved = self._saved_selection()
        self.selection = saved if saved is not None else self._measure(model, data)
        self.freeze = ExpertFreeze(model, self.selection, attention=self.cfg.esft_attention)
        trainable = trainable_params(model, self.selection, attention=self.cfg.esft_attention)
        targets = [f"layers.{i}.ffn.experts{e}" for i, e in self.selection.items()]
        return AdapterSummary(targets, trainable, sum(p.numel() for p in model.parameters()))

    def _saved_selection(self) -> dict[int, list[int]] | None:
        """A resumed run trains the experts it chose when it started (from finetune.json)."""
        saved = ModelDir(self.run_dir).finetune_summary() if self.resume else None
        if saved is None:
            return None
        if saved.esft_routing_share is not None:
            self.share = {int(k): v for k, v in saved.esft_routing_share.items()}
        return {int(k): v for k, v in (saved.esft_experts or {}).items()}

    def _measure(self, model: Transformer, data: TokenizedData) -> dict[int, list[int]]:
        assert self.pad_id is not None, "prepare_data() runs before prepare_model()"
        mass = data_routing_share(model, data, batch_size=self.batch_size, pad_id=self.pad_id)
        self.share = {layer: (m / m.sum().clamp_min(1e-12)).tolist() for layer, m in mass.items()}
        return select_experts(mass, self.cfg.esft_coverage)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """The frozen experts are put back after every optimizer step."""
        if self.freeze is not None:
            self.freeze.attach(optimizer)

    def _summary_detail(self) -> str:
        if not self.selection:
            return ""
        chosen = ", ".join(f"layer {k}: {v}" for k, v in self.selection.items())
        return f"; experts trained: {chosen}"

    def finetune_summary(self) -> FinetuneSummary:
        """Also the coverage, the experts trained and every expert's routing share."""
        summary = super().finetune_summary()
        if not self.selection:
            return summary
        share = self.share
        return dataclasses.replace(
            summary,
            esft_coverage=self.cfg.esft_coverage,
            esft_experts={str(k): v for k, v in self.selection.items()},
            esft_routing_share=(
                {str(k): v for k, v in share.items()} if share is not None else None
            ),
        )


# The method of each `finetune.method` value (moekit.finetune.config.METHODS lists them).
METHODS: dict[str, type[FineTuning]] = {
    cls.name: cls for cls in (LoRATuning, FullTuning, ESFTTuning)
}


def _data_line(data: TokenizedData) -> str:
    s = data.stats
    skipped = s["skipped_too_long"]
    return (
        f"fine-tuning data: {s['train_examples']} training and {s['val_examples']} validation "
        f"examples in rows of {s['row_tokens']} tokens, {s['target_tokens']:,} target tokens"
        + (f" ({skipped} without a target token after cutting)" if skipped else "")
    )
