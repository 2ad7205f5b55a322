"""Reading a model directory's weights the way the doctor needs them: stored dtypes from the
safetensors headers, tensors one at a time on demand, nothing converted."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class WeightFiles:
    """The tensors of a model directory's safetensors files, read one at a time on demand,
    with their stored dtypes ("F32", "BF16", ...) known without reading any data.

    Raises FileNotFoundError for a shard the index lists but the directory lacks, ValueError
    for a file that is not readable safetensors."""

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
        """The tensor `name`, as stored."""
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as f:
            return f.get_tensor(name)
