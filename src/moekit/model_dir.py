"""The model directory, moekit's one currency: every file name in it, and loading and saving
models, weights and run files.

```
MODEL_DIR/
  config.json                     ModelConfig (versioned)             every writer
  model.safetensors               weights, or shards + an index        every writer
  model-00001-of-0000N.safetensors, model.safetensors.index.json
  tokenizer.json                  a `tokenizers` tokenizer             train, convert, upcycle
  tokenizer_config.json           special tokens (imported tokenizers) convert, train
  chat_template.json              chat format                          finetune, upcycle
  run.json                        the resolved run config              train, finetune
  metrics.jsonl, tensorboard/     one JSON object per logged step      train, finetune
  train_state/                    checkpoints (step-NNNNNNNN/, latest) train, finetune
  report/                         the training report                  train, finetune
  finetune.json                   method, trainable parameters         finetune
  adapter/                        a LoRA adapter alone                 finetune --method lora
```

docs/model-directory.md specifies each file. Every write is atomic (moekit.files); weights are
safetensors only, never pickles.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.config import FILE_NAME as CONFIG_FILE
from moekit.config import ModelConfig
from moekit.files import read_json, write_json
from moekit.version import __version__
from moekit.weights import (  # re-exported: the weight files are part of the model directory
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    WEIGHTS_FILE,
    ShardWriter,
    StoredTensor,
    UnreadableWeightsError,
    check_fit,
    load_state_checked,
    load_weights,
    read_into,
    read_safetensors_header,
    save_weights,
    stored_tensors,
    weight_files,
)

if TYPE_CHECKING:
    # torch and the model are imported where weights are touched: naming the files of a model
    # directory (and `moekit info`) stays light.
    from collections.abc import Iterator

    import torch
    from torch import Tensor

    from moekit.model import Transformer

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "FinetuneSummary",
    "ModelDir",
    "ShardWriter",
    "StoredTensor",
    "UnreadableWeightsError",
    "check_fit",
    "load_model",
    "load_state_checked",
    "load_weights",
    "read_safetensors_header",
    "save_model",
    "save_weights",
    "stored_tensors",
    "weight_files",
]


class ModelDir:
    """A model directory at `path` (which need not exist yet).

    The class attributes are the names of the files a model directory may hold; the methods
    read and write them. `ModelDir(path).load_model()` builds the model its config describes
    and loads its weights.
    """

    CONFIG = CONFIG_FILE
    WEIGHTS = WEIGHTS_FILE
    INDEX = INDEX_FILE
    TOKENIZER = "tokenizer.json"
    TOKENIZER_CONFIG = "tokenizer_config.json"
    CHAT_TEMPLATE = "chat_template.json"
    GENERATION_CONFIG = "generation_config.json"  # a model's EOS ids and sampling defaults
    RUN_CONFIG = "run.json"
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tensorboard"
    TRAIN_STATE = "train_state"
    REPORT = "report"
    FINETUNE = "finetune.json"
    ADAPTER = "adapter"
    # Inside an adapter directory (adapter/, or one saved alone):
    ADAPTER_WEIGHTS = "adapter.safetensors"
    ADAPTER_CONFIG = "adapter_config.json"
    # The files that travel with a model wherever it is copied (convert, upcycle).
    TOKENIZER_FILES = (TOKENIZER, TOKENIZER_CONFIG, CHAT_TEMPLATE, GENERATION_CONFIG)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- what it holds -----------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.TOKENIZER

    @property
    def adapter_dir(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def train_state(self) -> Path:
        return self.path / self.TRAIN_STATE

    @property
    def report_dir(self) -> Path:
        return self.path / self.REPORT

    def is_model(self) -> bool:
        """Whether the directory holds a model config."""
        return self.config_path.is_file()

    def require_model(self, what: str = "") -> ModelDir:
        """Self, or FileNotFoundError naming the directory (`what` says whose it is)."""
        if not self.is_model():
            label = f"{what}: " if what else ""
            raise FileNotFoundError(
                f"{label}{self.path} is not a model directory (it holds no {self.CONFIG})"
            )
        return self

    def model_files(self) -> list[str]:
        """The names of the files here that make up a model (config and weights)."""
        names = [self.CONFIG, self.WEIGHTS, self.INDEX]
        return [n for n in names if (self.path / n).exists()]

    def refuse_overwrite(self, what: str) -> None:
        """ValueError when the directory already holds a model: nothing overwrites one."""
        held = self.model_files()
        if held:
            raise ValueError(
                f"{self.path} already holds a model ({', '.join(held)}); choose another "
                f"output directory ({what} never overwrites a model)"
            )

    def has_run(self) -> bool:
        """Whether the directory holds a training run's files (metrics or checkpoints)."""
        return (self.path / self.METRICS).is_file() or self.train_state.is_dir()

    # ---- config and model --------------------------------------------------------------
    def config(self) -> ModelConfig:
        """The model's config.json."""
        self.require_model()
        return ModelConfig.load(self.config_path)

    def save_config(self, cfg: ModelConfig) -> None:
        cfg.save(self.config_path)

    def weight_files(self) -> list[Path]:
        return weight_files(self.path)

    def load_weights(self, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        return load_weights(self.path, device)

    def save_weights(self, state: Mapping[str, Tensor], **kwargs: Any) -> list[Path]:
        kwargs.setdefault("metadata", {"moekit_version": __version__})
        return save_weights(state, self.path, **kwargs)

    def load_model(
        self, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> Transformer:
        """Build the model config.json describes on `device` ("auto": CUDA when present, else
        the CPU) and load its weights (cast to `dtype` when given, routers kept in float32).

        Before anything is allocated, the stored tensors' names and shapes (safetensors
        headers) are checked against that model, and its size against the device's memory:
        a mismatch is a ValueError naming the files and tensors, or the sizes.

        The model is built on the meta device and each stored tensor is read straight into
        its parameter: loading never holds a second copy of the weights."""
        from moekit.runtime import resolve_device

        device = resolve_device(device)
        model, stored = self.meta_model(dtype=dtype)
        self.check_memory(model, device)
        model.to_empty(device=device)
        read_into(model.state_dict(), stored)
        return model

    def meta_model(
        self, *, dtype: torch.dtype | None = None
    ) -> tuple[Transformer, dict[str, StoredTensor]]:
        """The model config.json describes, on the meta device (quantised modules where the
        config says; parameters cast to `dtype` when given), and the stored tensors, whose
        names and shapes have been checked against it (a ValueError names the mismatch)."""
        from moekit.model import cast_model
        from moekit.quant.build import meta_model  # quantised configs too

        cfg = self.config()
        stored = stored_tensors(self.path)
        try:
            model = meta_model(cfg)
        except ValueError as e:
            raise ValueError(f"{self.config_path}: {e}") from None
        expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        index = self.path / self.INDEX
        weights = index if index.exists() else self.path / self.WEIGHTS
        where = f"{weights} (with {self.config_path})"
        check_fit(expected, {k: t.shape for k, t in stored.items()}, where)
        if dtype is not None:
            cast_model(model, dtype)  # on the meta device: sets each parameter's dtype
        return model, stored

    def check_memory(self, model: torch.nn.Module, device: torch.device) -> None:
        """`moekit.model.check_memory`, its error naming this directory's config."""
        from moekit.model import check_memory

        try:
            check_memory(model, device)
        except ValueError as e:
            raise ValueError(f"{self.config_path}: {e}") from None

    def save_model(self, model: torch.nn.Module, cfg: ModelConfig) -> None:
        """Write `model`'s weights and `cfg` as config.json."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.save_weights(model.state_dict())
        self.save_config(cfg)

    # ---- run files ---------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl in order (a line torn by a crash is skipped)."""
        path = self.path / self.METRICS
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def checkpoint_dir(self, step: int) -> Path:
        return self.train_state / f"step-{step:08d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints of the run here, oldest first."""
        return sorted(self.train_state.glob("step-*"))

    def finetune_summary(self) -> FinetuneSummary | None:
        """finetune.json (what a fine-tuned model was trained with), or None."""
        path = self.path / self.FINETUNE
        if not path.is_file():
            return None
        data = read_json(path, what="fine-tuning summary")
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON object")
        try:
            return FinetuneSummary.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def write_finetune_summary(self, summary: FinetuneSummary) -> None:
        write_json(self.path / self.FINETUNE, summary.to_dict())

    def tokenizer_files(self) -> Iterator[Path]:
        """The tokenizer and chat-template files present here."""
        for name in self.TOKENIZER_FILES:
            if (self.path / name).is_file():
                yield self.path / name


@dataclass(frozen=True)
class FinetuneSummary:
    """What a fine-tuned model directory says of its training (finetune.json is `to_dict()`):
    the method, the base directory, trainable and total parameters, the adapted weights, and
    for ESFT the coverage, the experts trained per layer and every expert's routing share."""

    method: str
    base: str
    trainable_params: int
    total_params: int
    trainable_fraction: float
    targets: list[str]
    esft_coverage: float | None = None
    esft_experts: dict[str, list[int]] | None = None
    esft_routing_share: dict[str, list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneSummary:
        """The summary in `data` (fields a later moekit added are ignored); a field missing
        or of the wrong kind is a ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise ValueError(f"not a fine-tuning summary ({e})") from None

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> FinetuneSummary | None:
        """The summary in `run_dir`'s finetune.json, or None when there is none."""
        return ModelDir(run_dir).finetune_summary()


def load_model(
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """The model a model directory holds, on `device` (and cast to `dtype` when given)."""
    return ModelDir(directory).load_model(device=device, dtype=dtype)


def save_model(model: torch.nn.Module, cfg: ModelConfig, directory: str | os.PathLike[str]) -> None:
    """Write `model` and its config into the model directory `directory`."""
    ModelDir(directory).save_model(model, cfg)
