"""Files: atomic writes, JSON and JSON-lines, fsync. The leaf every other module may use.

Every write goes to a temporary name in the same directory, is fsynced, then renamed: a crash
mid-write leaves the previous file (or none) in place, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`
    with the usual file mode (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 and writers may recreate the file: give it the usual mode now.
        os.chmod(tmp_path, 0o666 & ~umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
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
