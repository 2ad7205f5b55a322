"""Files: atomic writes, and reading and writing model directories.

Every write goes to a temporary name in the same directory, is fsynced, then renamed: a
crash mid-write leaves the previous file (or none) in place, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from moekit.config import ModelConfig
    from moekit.nn.transformer import Transformer


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 and writers may recreate the file: give it the usual mode now.
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(path, write)


def read_jsonl(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, where, row) for each non-blank line of a .jsonl file, `where` being
    "file:line" for error messages. A file that is not UTF-8 or a line that is not JSON is a
    ValueError naming the file or the line; what a row must hold is the caller's to check."""
    try:
        # utf-8-sig: a byte-order mark would otherwise break the first line's JSON.
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {err}") from err
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and similar breaks.
    for lineno, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: malformed JSON ({err.msg})") from err
        yield lineno, where, row


# ---- model directories -------------------------------------------------------------------
# A model directory holds config.json, the weights as model.safetensors (or shards
# model-0000i-of-0000N.safetensors plus model.safetensors.index.json) and tokenizer.json.

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _save_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


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
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    names = (
        [WEIGHTS_NAME]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    written = [directory / name for name in names]
    for path, shard in zip(written, shards, strict=True):
        atomic_write(path, partial(_save_safetensors, shard, meta))
    if n > 1:
        weight_map = {
            key: path.name for path, shard in zip(written, shards, strict=True) for key in shard
        }
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(directory / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        written.append(directory / INDEX_NAME)
    keep = {p.name for p in written}
    # The index goes first: an index must never name shards that are already gone.
    for stale in [directory / INDEX_NAME, *directory.glob("model-*-of-*.safetensors"),
                  directory / WEIGHTS_NAME]:  # fmt: skip
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return written


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards of its index)."""
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from e
        return [directory / name for name in sorted(set(weight_map.values()))]
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")


def load_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of a model directory's safetensors files (memory-mapped while reading).

    A truncated or corrupt file is a ValueError that names it.
    """
    from safetensors import safe_open

    state: dict[str, Tensor] = {}
    for path in weight_files(directory):
        if not path.exists():
            raise FileNotFoundError(f"{path} is listed in {INDEX_NAME} but missing")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    state[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                "corrupt: restore it from a checkpoint in train_state/ or re-create it"
            ) from e
    return state


def load_state_checked(model: torch.nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load `state` into `model`, failing with the names of missing, unexpected or misshapen
    tensors (a partial load is never silent)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
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
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])


def save_model(model: torch.nn.Module, cfg: ModelConfig, directory: Path) -> None:
    """Write config.json and the weights of `model` into `directory`."""
    from moekit import __version__

    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), directory, metadata={"moekit_version": __version__})
    cfg.save(directory / "config.json")


def load_model(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """Build the model a directory's config.json describes and load its weights."""
    from moekit.config import ModelConfig
    from moekit.nn.transformer import build_model, cast_model

    directory = Path(directory)
    cfg = ModelConfig.load(directory)
    model = build_model(cfg, device=device, seed=None)
    load_state_checked(model, load_weights(directory, device), str(directory))
    return cast_model(model, dtype) if dtype is not None else model


class ShardWriter:
    """Writes tensors into safetensors shards as they come, holding at most one shard in
    memory (what converting a large checkpoint needs). Shards are written under temporary
    names and renamed once their count is known; `close()` writes the index when there is
    more than one."""

    def __init__(
        self,
        directory: Path,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._current: dict[str, Tensor] = {}
        self._size = 0
        self._parts: list[tuple[Path, list[str], int]] = []

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
        _save_safetensors(self._current, self.metadata, part)
        self._parts.append((part, list(self._current), self._size))
        self._current, self._size = {}, 0

    def close(self) -> list[Path]:
        """Finish: rename the shards into place, write the index, remove stale weight files."""
        if self._current or not self._parts:
            self._flush()
        n = len(self._parts)
        names = (
            [WEIGHTS_NAME]
            if n == 1
            else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        written = []
        for (part, _, _), name in zip(self._parts, names, strict=True):
            os.replace(part, self.directory / name)
            written.append(self.directory / name)
        if n > 1:
            weight_map = {
                k: name for (_, keys, _), name in zip(self._parts, names, strict=True) for k in keys
            }
            total = sum(size for _, _, size in self._parts)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_text(self.directory / INDEX_NAME, json.dumps(index, indent=2) + "\n")
            written.append(self.directory / INDEX_NAME)
        keep = {p.name for p in written}
        for stale in [self.directory / INDEX_NAME, *self.directory.glob("model-*-of-*.safetensors"),
                      self.directory / WEIGHTS_NAME]:  # fmt: skip
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        return written
