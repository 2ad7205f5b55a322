"""moekit.files: atomic writes, JSON and JSON lines."""

import errno
import fcntl
import json
import math
import os
import stat
import time

import pytest

from moekit.files import (
    STALE_AFTER_S,
    DiskFullError,
    atomic_write,
    atomic_write_text,
    disk_full,
    format_bytes,
    json_safe,
    read_json,
    read_jsonl,
    remove_stale_temporaries,
    umask,
    write_json,
)


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask()
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]  # no temporary left behind


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "kept")

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_text() == "kept"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_json_round_trip_and_errors_that_name_the_file(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": [1, 2.5, None]})
    assert path.read_text().endswith("\n")
    assert read_json(path) == {"a": [1, 2.5, None]}
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"x\.json \(settings\) is not valid JSON"):
        read_json(path, what="settings")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        read_json(tmp_path / "missing.json")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="unreadable"):
        read_json(path)


def test_json_safe_turns_non_finite_numbers_into_null():
    value = {"a": math.nan, 1: [math.inf, 2.0, (3, -math.inf)], "b": "text"}
    assert json_safe(value) == {"a": None, "1": [None, 2.0, [3, None]], "b": "text"}
    json.dumps(json_safe(value), allow_nan=False)


def test_read_jsonl_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": "x\xe2\x80\xa8y"}\n{oops\n')
    rows = read_jsonl(path)
    assert next(rows) == (1, f"{path}:1", {"a": 1})
    assert next(rows)[2] == {"a": "x\u2028y"}  # a raw line separator inside a string is data
    with pytest.raises(ValueError, match=r"rows\.jsonl:4: malformed JSON"):
        next(rows)
    path.write_bytes(b"\xff\n")
    with pytest.raises(ValueError, match="is not UTF-8"):
        list(read_jsonl(path))


def enospc(tmp):
    """A writer that gets half way, then finds the disk full."""
    tmp.write_text("half")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_leaves_the_previous_one(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "kept")
    with pytest.raises(DiskFullError) as info:
        atomic_write(path, enospc, needed=3_000_000)
    assert info.value.errno == errno.ENOSPC and info.value.path == path
    message = str(info.value)
    assert message.startswith(f"the disk is full: could not write {path} (it needs about 3.0 MB, ")
    assert " free); what was there before is unchanged" in message
    assert path.read_text() == "kept"
    assert os.listdir(tmp_path) == ["a.txt"]  # the temporary file is gone


def test_full_disks_are_recognised_however_a_writer_says_so(tmp_path):
    path = tmp_path / "w.safetensors"
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert isinstance(disk_full(rust, path), DiskFullError)
    assert isinstance(disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), path), DiskFullError)
    assert disk_full(OSError(errno.EACCES, "Permission denied"), path) is None
    # torch's file writer says only that a write failed: the free space tells.
    failed = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert disk_full(failed, path) is None
    assert isinstance(disk_full(failed, path, needed=10**18), DiskFullError)
    assert disk_full(failed, path, needed=1) is None


def test_temporaries_a_killed_writer_left_are_removed_by_the_next_write(tmp_path):
    old = time.time() - 2 * STALE_AFTER_S
    names = {
        "stale": ".model.safetensors.a1b2c3d4.tmp",  # an atomic write's, killed
        "rust": ".tmpAb12Cd",  # safetensors' own (or another program's): not for a text file
        "fresh": ".config.json.e5f6g7h8.tmp",  # another process is writing it now
        "held": ".run.json.i9j0k1l2.tmp",  # written slowly by a live process (locked)
        "mine": "notes.tmp",  # not a temporary of ours
    }
    for key, name in names.items():
        (tmp_path / name).write_text(key)
        if key != "fresh":
            os.utime(tmp_path / name, (old, old))
    fd = os.open(tmp_path / names["held"], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        atomic_write_text(tmp_path / "metrics.txt", "x")
    finally:
        os.close(fd)
    left = set(os.listdir(tmp_path))
    assert left == {"metrics.txt", *(names[k] for k in ("rust", "fresh", "held", "mine"))}
    # Released now; and a writer of safetensors files takes safetensors' temporaries too.
    removed = remove_stale_temporaries(tmp_path, safetensors=True)
    assert sorted(removed) == sorted([tmp_path / names["held"], tmp_path / names["rust"]])


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 1500, 3_000_000, 25_600_000_000_000)] == [
        "512 B",
        "1.5 kB",
        "3.0 MB",
        "25.6 TB",
    ]
