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

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.config import FILE_NAME as CONFIG_FILE
from moekit.config import ModelConfig
from moekit.files import (
    DiskFullError,
    atomic_path,
    atomic_write,
    fsync_dir,
    read_json,
    remove_stale_temporaries,
    write_json,
)
from moekit.version import __version__

if TYPE_CHECKING:
    # torch and the model are imported where weights are touched: naming the files of a model
    # directory (and `moekit info`) stays light.
    from collections.abc import Iterator

    import torch
    from torch import Tensor

    from moekit.model import Transformer

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class ModelDir:
    """A model directory at `path` (which need not exist yet).

    The class attributes are the names of the files a model directory may hold; the methods
    read and write them. `ModelDir(path).load_model()` builds the model its config describes
    and loads its weights.
    """

    CONFIG = CONFIG_FILE
    WEIGHTS = "model.safetensors"
    INDEX = "model.safetensors.index.json"
    TOKENIZER = "tokenizer.json"
    TOKENIZER_CONFIG = "tokenizer_config.json"
    CHAT_TEMPLATE = "chat_template.json"
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
    TOKENIZER_FILES = (TOKENIZER, TOKENIZER_CONFIG, CHAT_TEMPLATE)

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
        a mismatch is a ValueError naming the files and tensors, or the sizes."""
        from moekit.model import cast_model
        from moekit.quant.build import build_model, meta_model  # quantised configs too
        from moekit.runtime import resolve_device

        device = resolve_device(device)
        cfg = self.config()
        stored = stored_tensors(self.path)
        expected = {k: tuple(t.shape) for k, t in meta_model(cfg).state_dict().items()}
        index = self.path / self.INDEX
        weights = index if index.exists() else self.path / self.WEIGHTS
        where = f"{weights} (with {self.config_path})"
        check_fit(expected, {k: t.shape for k, t in stored.items()}, where)
        try:
            model = build_model(cfg, device=device, seed=None)
        except ValueError as e:
            raise ValueError(f"{self.config_path}: {e}") from None
        load_state_checked(model, self.load_weights(device), str(self.path))
        return cast_model(model, dtype) if dtype is not None else model

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


# ---- safetensors weights (a model directory, a checkpoint, an adapter) ------------------------


def _save_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [ModelDir.WEIGHTS]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _remove_stale_layouts(directory: Path, written: list[Path]) -> None:
    """Remove weight files left from an earlier save of a different layout (the index first:
    an index must never name shards that are already gone)."""
    keep = {p.name for p in written}
    index_path = directory / ModelDir.INDEX
    stale = [index_path, *directory.glob("model-*-of-*.safetensors"), directory / ModelDir.WEIGHTS]
    for path in stale:
        if path.name not in keep:
            path.unlink(missing_ok=True)
    fsync_dir(directory)


def save_weights(
    state: Mapping[str, Tensor],
    directory: Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write `state` as safetensors into `directory`, sharded above `max_shard_bytes`.

    Every file is written atomically; shards or a single file left from an earlier save of a
    different layout are removed afterwards. Returns the files written.
    """
    with ShardWriter(directory, max_shard_bytes=max_shard_bytes, metadata=metadata) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        return writer.close()


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards of its index).

    An index that is not valid JSON, or names anything but a plain file name in this directory
    (`../x.safetensors`, an absolute path), is a ValueError naming the index and the entry.
    (A shard that is a symbolic link, as in Hugging Face's cache, is still followed.)"""
    single, index = directory / ModelDir.WEIGHTS, directory / ModelDir.INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from e
        if not isinstance(weight_map, dict):
            kind = type(weight_map).__name__
            raise ValueError(f"{index} is not a valid safetensors index (weight_map is a {kind})")
        for tensor, name in weight_map.items():
            # Only a plain file name, on any system (":" is a Windows drive or stream).
            if not isinstance(name, str) or name in ("", ".", "..") or set(name) & set("/\\:\0"):
                raise ValueError(
                    f"{index} names {name!r} for tensor {tensor!r}: an index may only name "
                    f"files in its own directory ({directory}), by plain file name"
                )
        return [directory / name for name in sorted(set(weight_map.values()))]
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no {ModelDir.WEIGHTS} or {ModelDir.INDEX} in {directory}")


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as its safetensors header describes it: dtype ("F32", "BF16", ...), shape."""

    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, from its header alone (no tensor data is read).

    The header must be well formed and the file exactly as long as the header says: a
    truncated, padded or corrupt header is an UnreadableWeightsError (a ValueError) naming
    the file."""
    tensors: dict[str, StoredTensor] = {}
    end = 0
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            # safetensors refuses headers above 100 MB; so do we, before reading one.
            if size < 8 or length > min(size - 8, 100_000_000):
                raise UnreadableWeightsError(path, f"{size} bytes cannot hold its header")
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(dtype, str) or not all(
                isinstance(n, int) and n >= 0 for n in [*shape, begin, stop]
            ):
                raise ValueError(f"tensor {name!r} has a malformed entry")
            tensors[name] = StoredTensor(dtype, tuple(shape))
            end = max(end, stop)
    except UnreadableWeightsError:
        raise
    except OSError as e:
        raise UnreadableWeightsError(path, str(e)) from e
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UnreadableWeightsError(path, f"malformed header: {e}") from e
    if (described := 8 + length + end) != size:
        reason = f"it holds {size} bytes where its header describes {described}"
        raise UnreadableWeightsError(path, reason)
    return tensors


class UnreadableWeightsError(ValueError):
    """A safetensors file that cannot be read: `path`, and the `reason` in a few words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"{path} is not a readable safetensors file ({reason}); it may be truncated or "
            "corrupt: restore it from a checkpoint in train_state/ or re-create it"
        )
        self.path, self.reason = path, reason


def stored_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of a directory's safetensors files, from their headers (no data is read);
    a listed shard that is missing is a FileNotFoundError, an unreadable file a ValueError."""
    tensors: dict[str, StoredTensor] = {}
    for path in weight_files(directory):
        if not path.exists():
            raise FileNotFoundError(f"{path} is listed in {ModelDir.INDEX} but missing")
        tensors.update(read_safetensors_header(path))
    return tensors


def load_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of a directory's safetensors files (memory-mapped while reading), on
    `device` ("auto": CUDA when present, else the CPU).

    A truncated or corrupt file is a ValueError that names it.
    """
    from safetensors import SafetensorError, safe_open

    from moekit.runtime import resolve_device

    device = resolve_device(device)
    state: dict[str, Tensor] = {}
    for path in weight_files(directory):
        if not path.exists():
            raise FileNotFoundError(f"{path} is listed in {ModelDir.INDEX} but missing")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    state[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UnreadableWeightsError(path, str(e)) from e
    return state


def load_state_checked(model: torch.nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load `state` into `model`, failing with the names of missing, unexpected or misshapen
    tensors (a partial load is never silent)."""
    import torch

    own = model.state_dict()
    shapes = {k: tuple(t.shape) for k, t in own.items()}
    check_fit(shapes, {k: tuple(t.shape) for k, t in state.items()}, source)
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])


def check_fit(
    expected: Mapping[str, tuple[int, ...]], stored: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """ValueError naming `source` and the tensors when the `stored` names and shapes are not
    exactly those a model `expected`: missing, unexpected or misshapen ones."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    misshapen = [
        f"{k}: file {tuple(stored[k])} vs model {tuple(expected[k])}"
        for k in expected
        if k in stored and tuple(stored[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}")
    if misshapen:
        problems.append(f"shape mismatch: {'; '.join(misshapen[:5])}")
    if problems:
        raise ValueError(f"{source} does not fit the model config: " + "; ".join(problems))


class ShardWriter:
    """Writes tensors into safetensors shards as they come, holding at most one shard in
    memory (what converting a large checkpoint needs). Shards are written under temporary
    names and renamed once their count is known; `close()` writes the index when there is
    more than one and removes weight files of an earlier layout.

    Used as a context manager it closes on success and, when the body raises, removes the
    shards it wrote (`abort()`), leaving the directory's earlier weights as they were."""

    def __init__(
        self,
        directory: Path,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".part-*.safetensors.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        remove_stale_temporaries(directory, safetensors=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._current: dict[str, Tensor] = {}
        self._size = 0
        self._parts: list[tuple[Path, list[str], int]] = []
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def abort(self) -> None:
        """Remove the shards written so far; nothing of this write is left behind."""
        for part, _, _ in self._parts:
            part.unlink(missing_ok=True)
        self._parts, self._current, self._size, self._closed = [], {}, 0, True

    def add(self, name: str, tensor: Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._current and self._size + nbytes > self.max_shard_bytes:
            self._flush()
        if name in self._current or any(name in keys for _, keys, _ in self._parts):
            raise ValueError(f"tensor {name!r} written twice")
        self._current[name] = tensor
        self._size += nbytes

    def _flush(self) -> None:
        part = self.directory / f".part-{len(self._parts):05d}.safetensors.tmp"
        # Through atomic_write: the part is fsynced, has the usual file mode, and a full disk
        # is a DiskFullError (named after the weights, not the part's temporary name).
        try:
            write = partial(_save_safetensors, self._current, self.metadata)
            atomic_write(part, write, needed=self._size)
        except DiskFullError as e:
            written = sum(size for _, _, size in self._parts)
            what = f"the weights in {self.directory}"
            raise DiskFullError(part, written + self._size, e.free, what) from e
        self._parts.append((part, list(self._current), self._size))
        self._current, self._size = {}, 0

    def close(self) -> list[Path]:
        """Finish: rename the shards into place, write the index, remove stale weight files."""
        if self._closed:
            raise ValueError("this ShardWriter is already closed")
        self._closed = True
        if self._current or not self._parts:
            self._flush()
        names = _shard_names(len(self._parts))
        shards = [self.directory / name for name in names]
        written = list(shards)
        weight_map = {
            k: name for (_, keys, _), name in zip(self._parts, names, strict=True) for k in keys
        }
        total = sum(size for _, _, size in self._parts)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        # The index is written before any shard is renamed, and renamed into place after
        # them: a write that fails (a full disk) leaves the earlier weights as they were.
        with contextlib.ExitStack() as stack:
            if len(written) > 1:
                index_tmp = stack.enter_context(atomic_path(self.directory / ModelDir.INDEX))
                index_tmp.write_text(json.dumps(index, indent=2) + "\n")
                written.append(self.directory / ModelDir.INDEX)
            for (part, _, _), path in zip(self._parts, shards, strict=True):
                os.replace(part, path)
        _remove_stale_layouts(self.directory, written)
        return written
