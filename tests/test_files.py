"""moekit.files: atomic writes, JSON and JSON lines."""

import json
import math
import os
import stat

import pytest

from moekit.files import (
    atomic_write,
    atomic_write_text,
    json_safe,
    read_json,
    read_jsonl,
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
