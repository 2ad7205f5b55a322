"""Training methods: what pre-training, LoRA, full fine-tuning and ESFT each do differently,
behind one interface the trainer drives. The trainer's loop, metrics, checkpoints, resume and
report are the same for all of them.

The fine-tuning methods live in moekit.finetune.methods (below the trainer in the layering):
they match `TrainingMethod` by shape, without importing it. `training_method` picks the one a
run config asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from moekit.data.loader import TokenizedData, prepare_data
from moekit.data.tokenizer import Tokenizer
from moekit.finetune.replay_data import routing_decoder
from moekit.model import Transformer
from moekit.model_dir import ModelDir, load_state_checked, load_weights
from moekit.training.config import RunConfig

Say = Callable[[str], None]


@runtime_checkable
class TrainingMethod(Protocol):
    """One way of training a model. The trainer calls, in this order: `prepare_data`,
    `sample_prompts`, `prepare_model` (on the freshly built model), `summary_line`, `attach`
    (on the optimizer), and then `write_files` once the run is set up; `save` at every
    checkpoint. A method is made for one run (its directory, and whether the run resumes:
    a method that chose something when the run started reads it back from the directory)."""

    @property
    def name(self) -> str:
        """The method's name: "pretrain", "lora", "full", "esft"."""
        ...

    @property
    def balance_routers(self) -> bool:
        """Whether the routers' aux-loss-free balancing biases take their step after each
        update (a method that freezes the routers freezes them too)."""
        ...

    @property
    def pad_id(self) -> int | None:
        """The input token that is padding (it routes to no expert and counts in no
        statistic), or None when rows hold no padding; known after `prepare_data`."""
        ...

    def prepare_data(self, say: Say) -> tuple[Tokenizer, TokenizedData]:
        """The run's tokenizer and its training and validation rows; `say` takes progress
        lines (what the data holds)."""
        ...

    def sample_prompts(self) -> list[str]:
        """Prompts whose continuations the report shows."""
        ...

    def prepare_model(self, model: Transformer, data: TokenizedData) -> None:
        """Make the freshly built model what this method trains: load starting weights,
        apply adapters, freeze what does not train. On resume the checkpoint's weights are
        loaded afterwards, over whatever this loads."""
        ...

    def summary_line(self) -> str | None:
        """One line on what trains (shown at the start and in the report); None when the
        whole model trains from its config (pre-training)."""
        ...

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook into the optimizer (e.g. restore frozen weights after each step)."""
        ...

    def save(self, model: Transformer) -> None:
        """Write the run directory's model files (config and weights) from the live model."""
        ...

    def write_files(self) -> None:
        """Write the method's own files into the run directory (e.g. finetune.json)."""
        ...


class Pretraining:
    """Training the model the run config describes: from a fresh initialisation, or from the
    weights (and tokenizer) of `train.init_from`, on `data` with a BPE tokenizer trained on
    it (or the source model's, or on resume the run's own)."""

    name = "pretrain"
    balance_routers = True
    pad_id = None

    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume: bool) -> None:
        self.cfg, self.run_dir, self.resume = cfg, run_dir, resume
        self.init_from = Path(cfg.train.init_from) if cfg.train.init_from is not None else None

    def prepare_data(self, say: Say) -> tuple[Tokenizer, TokenizedData]:
        model, tc = self.cfg.model, self.cfg.train
        tokenizer = None
        if self.resume:
            tokenizer = Tokenizer.load(self.run_dir)
        elif self.init_from is not None and ModelDir(self.init_from).tokenizer_path.is_file():
            tokenizer = Tokenizer.load(self.init_from)  # keep the source model's vocabulary
        say("preparing data ...")
        tok, data = prepare_data(
            self.cfg.data, model.vocab_size, tc.seq_len, tokenizer=tokenizer, say=say,
            routing_of=routing_decoder(model),
        )  # fmt: skip
        if tok.vocab_size > model.vocab_size:
            raise ValueError(
                f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
                f"{model.vocab_size}"
            )
        if len(data.train) < tc.batch_size:
            raise ValueError(
                f"the training split packs into {len(data.train)} rows of {tc.seq_len + 1} "
                f"tokens, fewer than train.batch_size={tc.batch_size}; use more data or smaller "
                "train.seq_len / train.batch_size"
            )
        replayed = ""
        if data.train_routing is not None:
            rows = int(data.train_routing.mask.any(dim=1).sum())
            replayed = f" ({rows} replay a recorded routing)"
        say(
            f"data: {len(data.train)} training rows{replayed}, {len(data.val)} validation rows "
            f"of {tc.seq_len} tokens; vocabulary {tok.vocab_size}"
        )
        return tok, data

    def sample_prompts(self) -> list[str]:
        return list(self.cfg.train.samples)

    def prepare_model(self, model: Transformer, data: TokenizedData) -> None:
        """Start from `train.init_from`'s weights (continued pre-training, e.g. after
        upcycling) when set; its config must describe the same model."""
        if self.init_from is None or self.resume:
            return
        source = self.init_from
        if ModelDir(source).require_model("train.init_from").config() != self.cfg.model:
            raise ValueError(
                f"train.init_from: {source} holds a different model than the model section"
            )
        device = next(model.parameters()).device
        load_state_checked(model, load_weights(source, device), str(source))

    def summary_line(self) -> None:
        return None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def save(self, model: Transformer) -> None:
        ModelDir(self.run_dir).save_model(model, model.cfg)  # with train.grow, the grown one

    def write_files(self) -> None:
        pass


def training_method(cfg: RunConfig, run_dir: Path, *, resume: bool) -> TrainingMethod:
    """The method `cfg` asks for: its finetune section's method, else pre-training."""
    if cfg.finetune is None:
        return Pretraining(cfg, run_dir, resume=resume)
    from moekit.finetune.methods import METHODS

    tc = cfg.train
    return METHODS[cfg.finetune.method](
        cfg.finetune, run_dir, resume=resume, model=cfg.model, seq_len=tc.seq_len,
        seed=tc.seed, batch_size=tc.batch_size,
    )  # fmt: skip
