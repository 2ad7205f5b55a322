"""Hugging Face checkpoint directories: their file names, and their tensors read lazily.

A Hugging Face model directory holds config.json, safetensors weights (one file, or shards
with model.safetensors.index.json), usually tokenizer.json with tokenizer_config.json, and on
export generation_config.json. These are Hugging Face's names for Hugging Face's files; the
files of a moekit model directory are named by `moekit.model_dir.ModelDir`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from moekit.files import read_json
from moekit.interop.fields import UnsupportedError

HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


class LazyTensors:
    """Named tensors spread over safetensors files, each read (memory-mapped) only when asked
    for, so a conversion holds one tensor at a time. `label` names the owner in errors."""

    def __init__(self, file_of: dict[str, Path], label: str) -> None:
        self._file_of = file_of
        self._open: dict[Path, Any] = {}
        self.label = label

    @classmethod
    def of_files(cls, files: Iterable[Path], label: str) -> LazyTensors:
        """The tensors of safetensors `files` (the names are read from their headers)."""
        from safetensors import safe_open

        file_of: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                file_of.update(dict.fromkeys(f.keys(), path))
        return cls(file_of, label)

    def keys(self) -> list[str]:
        return list(self._file_of)

    def has(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> Tensor:
        """The tensor `key`; UnsupportedError when there is none, ValueError naming a file that
        cannot be read."""
        from safetensors import safe_open

        path = self._file_of.get(key)
        if path is None:
            raise UnsupportedError(f"{self.label} has no tensor {key!r}")
        if path not in self._open:
            try:
                self._open[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
        tensor: Tensor = self._open[path].get_tensor(key)
        return tensor


class HFCheckpoint:
    """A Hugging Face model directory: its config.json as a dict (`config`) and its tensors,
    read lazily one by one (`keys`, `has`, `get`)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        config = self.directory / HF_CONFIG
        if not config.is_file():
            raise FileNotFoundError(f"{self.directory} has no {HF_CONFIG}")
        data = read_json(config)
        if not isinstance(data, dict):
            raise ValueError(f"{config} is not a JSON object")
        self.config: dict[str, Any] = data
        self.tensors = self._tensors()

    def _tensors(self) -> LazyTensors:
        index = self.directory / HF_INDEX
        if index.is_file():
            weight_map = read_json(index)["weight_map"]
            file_of = {k: self.directory / v for k, v in weight_map.items()}
            return LazyTensors(file_of, "the checkpoint")
        single = self.directory / HF_WEIGHTS
        if not single.is_file():
            raise FileNotFoundError(
                f"{self.directory} holds no {HF_WEIGHTS} or {HF_INDEX} (only safetensors "
                "checkpoints are read; convert .bin files with transformers first)"
            )
        return LazyTensors.of_files([single], "the checkpoint")

    def keys(self) -> list[str]:
        return self.tensors.keys()

    def has(self, key: str) -> bool:
        return self.tensors.has(key)

    def get(self, key: str) -> Tensor:
        return self.tensors.get(key)
