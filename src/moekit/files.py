"""Files: atomic writes, JSON and JSON-lines, fsync, and byte sizes for people (format_bytes,
parse_size). The leaf every other module may use.

Every write goes to a temporary name in the same directory, is fsynced, then renamed: a crash
mid-write leaves the previous file (or none) in place, never a half-written one. A write that
finds the disk full raises `DiskFullError` (naming the file) and removes its temporary file;
temporary files that a killed process left behind are removed by the next write into the
same directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

try:
    import fcntl
except ImportError:  # Windows: stale temporaries are recognised by their age alone
    fcntl = None  # type: ignore[assignment]

# errno values that mean "no room to write": a full disk, or a full quota.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# How writers that are not Python file objects report a full disk (safetensors' Rust I/O).
_FULL_TEXT = ("(os error 28)", "(os error 122)", "No space left on device", "Disk quota exceeded")
# Temporary names: ours (`.NAME.XXXXXXXX.tmp`, from mkstemp) and safetensors' own (`.tmpXXXXXX`,
# which it renames onto ours when done; other programs' temporaries may look the same, so
# only a writer of safetensors files removes those).
_OURS = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_SAFETENSORS = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
# A temporary file untouched for this long, whose lock nobody holds, belongs to a dead writer.
STALE_AFTER_S = 60.0
# Without file locks (Windows), age alone has to tell: wait much longer.
_STALE_AFTER_UNLOCKED_S = 24 * 3600.0


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full. `path` is the file that
    could not be written (`what` says it in words, when a path alone would not); `needed` the
    bytes it would have taken and `free` the bytes free on its disk, when known. The file's
    earlier version, if any, is left as it was."""

    def __init__(
        self,
        path: Path,
        needed: int | None = None,
        free: int | None = None,
        what: str | None = None,
    ) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.path, self.needed, self.free, self.what = path, needed, free, what

    @property
    def problem(self) -> str:
        """What failed, with the sizes when known: "the disk is full: could not write ..."."""
        sizes = []
        if self.needed is not None:
            sizes.append(f"it needs about {format_bytes(self.needed)}")
        if self.free is not None:
            sizes.append(f"{format_bytes(self.free)} free")
        detail = f" ({', '.join(sizes)})" if sizes else ""
        return f"the disk is full: could not write {self.what or self.path}{detail}"

    def __str__(self) -> str:
        return f"{self.problem}; what was there before is unchanged. Free some space and try again"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.needed, self.free, self.what))


def format_bytes(n: int) -> str:
    """`n` bytes for a person: "512 B", "3.1 MB", "25.6 TB" (powers of 1000)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
SIZE_FORMS = (
    "a number of bytes, or a number with a unit: B, KB, MB, GB, TB (powers of 1000) or "
    "KiB, MiB, GiB, TiB (also K, M, G, T; powers of 1024), e.g. 6GiB, 500MB or 1.5G"
)


def parse_size(text: str) -> int:
    """The bytes a size such as "6GiB", "500MB", "1.5G" or "1000000" means; anything else is
    a ValueError naming the accepted forms."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    if m is None or m[2].lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size; use {SIZE_FORMS}")
    size = int(float(m[1]) * _UNITS[m[2].lower()])
    if size <= 0:
        raise ValueError(f"{text!r} is not a memory size above zero; use {SIZE_FORMS}")
    return size


def free_bytes(path: Path) -> int | None:
    """The bytes free on the disk that holds `path` (or its nearest existing parent), or None
    when that cannot be read."""
    for where in (path, *path.parents):
        if where.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(where).free
            return None
    return None


def disk_full(err: BaseException, path: Path, *, needed: int | None = None) -> DiskFullError | None:
    """`err` as a DiskFullError for `path` when it says the disk is full, else None.

    An OSError says so by its errno; a writer that reports failures in words (safetensors,
    torch's file writer) by its message, or, when `needed` is known, by finding fewer bytes
    free than the write needed."""
    if isinstance(err, DiskFullError):
        return err
    full = isinstance(err, OSError) and err.errno in _FULL
    full = full or any(text in str(err) for text in _FULL_TEXT)
    if not full and needed is not None and isinstance(err, OSError | RuntimeError):
        free = free_bytes(path)
        full = free is not None and free < needed
    if not full:
        return None
    return DiskFullError(path, needed, free_bytes(path))


@contextlib.contextmanager
def atomic_path(path: Path, *, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`
    with the usual file mode (0666 less the umask).

    A full disk, wherever it strikes, is a DiskFullError naming `path` (with `needed`, the
    bytes the write takes, when the caller knows them); the temporary file is removed and
    `path` is left as it was. Before writing, temporary files of earlier writes into the same
    directory that no live process holds are removed (`remove_stale_temporaries`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        _raise_as_disk_full(err, path, needed)
    tmp_path = Path(tmp)
    # Held until the rename: it tells other processes' clean-ups that this file is in use.
    locks = [fd]
    _lock(fd)
    try:
        try:
            yield tmp_path
            _lock_again(tmp_path, locks)
            # mkstemp makes 0600 and writers may recreate the file: give it the usual mode now.
            os.chmod(tmp_path, 0o666 & ~umask())
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        except Exception as err:
            # Removed before the free space is measured: the message says what is free now.
            tmp_path.unlink(missing_ok=True)
            _raise_as_disk_full(err, path, needed)
        fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)
        for held in locks:
            os.close(held)


def _raise_as_disk_full(err: Exception, path: Path, needed: int | None) -> NoReturn:
    """Raise `err`, as a DiskFullError for `path` when it says the disk is full."""
    full = disk_full(err, path, needed=needed)
    if full is None or full is err:
        raise err
    raise full from err


def _lock(fd: int) -> None:
    """Take the exclusive lock of the open file `fd` (where the filesystem has locks)."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _lock_again(tmp_path: Path, locks: list[int]) -> None:
    """Lock `tmp_path` again when the writer replaced the file under it (safetensors writes
    a file of its own and renames it onto the name it was given)."""
    if fcntl is None:
        return
    with contextlib.suppress(OSError):
        if os.stat(tmp_path).st_ino != os.fstat(locks[-1]).st_ino:
            fd = os.open(tmp_path, os.O_RDONLY)
            locks.append(fd)
            _lock(fd)


def remove_stale_temporaries(directory: Path, *, safetensors: bool = False) -> list[Path]:
    """Remove the temporary files that writes into `directory` left behind when their process
    was killed (`.NAME.XXXXXXXX.tmp` from `atomic_path`; with `safetensors`, which a writer of
    safetensors files into `directory` passes, also the library's own `.tmpXXXXXX`), and
    return them. A file counts as left behind when no process holds its lock and it has not
    changed for `STALE_AFTER_S` seconds, so writes running in other processes keep theirs."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not (_OURS.match(entry.name) or (safetensors and _SAFETENSORS.match(entry.name))):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        path = Path(entry.path)
        if not _in_use(path, age):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _in_use(path: Path, age: float) -> bool:
    """Whether a temporary file may still belong to a running write (when in doubt, yes)."""
    if fcntl is None:
        return age < _STALE_AFTER_UNLOCKED_S
    if age < STALE_AFTER_S:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True  # locked by a live writer (or the filesystem cannot say)
    finally:
        os.close(fd)  # closing releases the lock just taken
    return False


def umask() -> int:
    """The process's file-creation mask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink inside `directory` durable (a no-op where the filesystem does
    not let a directory be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None], *, needed: int | None = None) -> None:
    """Call `write(tmp_path)` and move the result onto `path` atomically (see `atomic_path`;
    `needed`, the bytes the file takes when known, goes into a full disk's message)."""
    with atomic_path(path, needed=needed) as tmp:
        write(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(path, write)


def write_json(path: Path, data: Any, *, indent: int | None = 2) -> None:
    """Write `data` as JSON (ending in a newline) to `path` atomically. Non-finite floats are
    written as JavaScript does (NaN), which Python's json module reads back."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def read_json(path: Path, *, what: str = "") -> Any:
    """The JSON value in `path`. A missing file is FileNotFoundError; an unreadable or
    malformed one a ValueError naming the file (and `what` it should hold)."""
    label = f"{path}" + (f" ({what})" if what else "")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{label} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{label} is unreadable ({err})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{label} is not valid JSON ({err})") from err


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


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float as None, recursively (JSON has no NaN or infinity),
    and dictionary keys as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
