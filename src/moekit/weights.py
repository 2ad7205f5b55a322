"""Safetensors weight files: reading headers, reading tensors straight into a model's memory,
and writing (sharded, atomic) weights. `moekit.model_dir` names the files of a model
directory and re-exports what is here.

A safetensors file is an 8-byte little-endian header length, a JSON header that gives every
tensor's dtype, shape and byte range, and the tensors' bytes. Reading a tensor by its range
(`read_tensor`) lets a loader fill a model's own parameters without an intermediate copy of the
weights, and lets paged experts read one expert's slice of a stacked tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.files import (
    DiskFullError,
    atomic_path,
    atomic_write,
    fsync_dir,
    remove_stale_temporaries,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# safetensors dtype names -> torch dtype names (resolved lazily: torch is imported late).
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def _save_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [WEIGHTS_FILE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _remove_stale_layouts(directory: Path, written: list[Path]) -> None:
    """Remove weight files left from an earlier save of a different layout (the index first:
    an index must never name shards that are already gone)."""
    keep = {p.name for p in written}
    index_path = directory / INDEX_FILE
    stale = [index_path, *directory.glob("model-*-of-*.safetensors"), directory / WEIGHTS_FILE]
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
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
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
    raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {directory}")


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as its safetensors header describes it: dtype ("F32", "BF16", ...), shape,
    and where its bytes lie: `path`, and the absolute byte range [begin, end) in that file."""

    dtype: str
    shape: tuple[int, ...]
    path: Path | None = None
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


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
            if begin > stop:
                raise ValueError(f"tensor {name!r} ends before it begins")
            start = 8 + length  # data offsets count from the end of the header
            tensors[name] = StoredTensor(dtype, tuple(shape), path, start + begin, start + stop)
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
            raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing")
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
            raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    state[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UnreadableWeightsError(path, str(e)) from e
    return state


def torch_dtype(name: str, stored: StoredTensor) -> torch.dtype:
    """The torch dtype of stored tensor `name`; one moekit cannot read is an
    UnreadableWeightsError naming the file and the tensor."""
    import torch

    dtype = getattr(torch, DTYPES.get(stored.dtype, ""), None)
    if not isinstance(dtype, torch.dtype):
        where = stored.path or Path("?")
        raise UnreadableWeightsError(where, f"tensor {name!r} has unknown dtype {stored.dtype}")
    return dtype


def read_tensor(
    name: str, stored: StoredTensor, out: Tensor, fd: int, *, index: int | None = None
) -> Tensor:
    """Read stored tensor `name` (or, with `index`, its index-th slice along the first
    dimension: one expert of a stacked tensor, contiguous in the file) from the open file `fd`
    into `out`, cast to `out`'s dtype and device as `copy_` casts. A CPU `out` of the stored
    dtype is filled in place with no intermediate buffer.

    A byte range that does not match the dtype and shape, or a file shorter than the header
    says (truncated since it was opened), is an UnreadableWeightsError naming file and tensor."""
    import torch

    dtype = torch_dtype(name, stored)
    shape = stored.shape if index is None else stored.shape[1:]
    numel = 1
    for n in shape:
        numel *= n
    size = numel * dtype.itemsize
    path = stored.path or Path("?")
    rows = 1 if index is None else (stored.shape[0] if stored.shape else 0)
    if stored.nbytes != size * rows:
        described = f"{stored.dtype} {list(stored.shape)}"
        reason = (
            f"tensor {name!r} holds {stored.nbytes} bytes where {described} needs {size * rows}"
        )
        raise UnreadableWeightsError(path, reason)
    if index is not None and not 0 <= index < rows:
        raise IndexError(f"{name}: slice {index} of {rows}")
    direct = (
        out.device.type == "cpu"
        and out.dtype == dtype
        and out.is_contiguous()
        and tuple(out.shape) == tuple(shape)
    )
    buf = out.detach() if direct else torch.empty(shape, dtype=dtype)
    offset = stored.begin + (0 if index is None else index * size)
    view = buf.reshape(-1).view(torch.uint8).numpy().data if numel else memoryview(b"")
    done = 0
    while done < size:
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise UnreadableWeightsError(path, f"reading tensor {name!r}: {e}") from e
        if got == 0:
            reason = f"it ends before the bytes of tensor {name!r} (truncated while in use?)"
            raise UnreadableWeightsError(path, reason)
        done += got
    if not direct:
        with torch.no_grad():
            out.copy_(buf)
    return out


def open_weights(path: Path, name: str = "") -> int:
    """A read-only file descriptor of weight file `path` (close it with os.close); a file that
    cannot be opened is an UnreadableWeightsError naming it (and tensor `name`, when given)."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        what = f"reading tensor {name!r}: " if name else ""
        raise UnreadableWeightsError(path, f"{what}{e.strerror or e}") from e


def read_into(targets: Mapping[str, Tensor], stored: Mapping[str, StoredTensor]) -> None:
    """Read each stored tensor into the target of the same name (names and shapes checked
    beforehand with `check_fit`), file by file in file order: a model's own parameters are
    filled with no second copy of the weights held at any time (at most one tensor's
    buffer, when a tensor is cast to another dtype or read for another device)."""
    by_file: dict[Path, list[str]] = {}
    for name in targets:
        where = stored[name].path
        assert where is not None, f"{name} has no file"
        by_file.setdefault(where, []).append(name)
    for path, names in by_file.items():
        fd = open_weights(path)
        try:
            for name in sorted(names, key=lambda n: stored[n].begin):
                read_tensor(name, stored[name], targets[name], fd)
        finally:
            os.close(fd)


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
                index_tmp = stack.enter_context(atomic_path(self.directory / INDEX_FILE))
                index_tmp.write_text(json.dumps(index, indent=2) + "\n")
                written.append(self.directory / INDEX_FILE)
            for (part, _, _), path in zip(self._parts, shards, strict=True):
                os.replace(part, path)
        _remove_stale_layouts(self.directory, written)
        return written
