"""The shared validators of moekit's config dataclasses, and their JSON base class.

Configs often arrive from JSON, YAML or dotted command-line overrides, so each field is checked
on construction with a `ValueError` that names the owner, the field, the value and what would
be valid: `fail("MoEConfig", "top_k", 0, "must be >= 1")`.
"""

from __future__ import annotations

import dataclasses
import typing
from types import UnionType
from typing import Any, ClassVar


def fail(owner: str, name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{owner}.{name}={value!r} is invalid: {allowed}")


def check_positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise fail(owner, name, value, "must be a positive number")


def check_non_negative(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise fail(owner, name, value, "must be >= 0")


def check_field_types(obj: Any) -> None:
    """Reject values of the wrong type (a float where an int is expected, a string for a bool):
    configs often arrive from JSON or YAML."""
    owner = type(obj).__name__
    for name, tp in typing.get_type_hints(type(obj)).items():
        if name.startswith("_") or not hasattr(obj, name):
            continue
        value = getattr(obj, name)
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, UnionType) else ()
        if value is None and type(None) in args:
            continue
        base = next((a for a in args if a is not type(None)), tp) if args else tp
        if base is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise fail(owner, name, value, "must be an integer")
        if base is float and isinstance(value, str):
            # YAML 1.1 reads `3e-4` as a string; accept any number written as text.
            try:
                value = float(value)
            except ValueError:
                raise fail(owner, name, value, "must be a number") from None
            object.__setattr__(obj, name, value)
        if base is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise fail(owner, name, value, "must be a number")
        if base is bool and not isinstance(value, bool):
            raise fail(owner, name, value, "must be true or false")
        if base is str and not isinstance(value, str):
            raise fail(owner, name, value, "must be a string")


def check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise fail(owner, name, value, f"must be one of {', '.join(map(repr, choices))}")


class ConfigBase:
    """JSON helpers shared by the config dataclasses (nested configs become nested dicts)."""

    _nested: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                f"known fields are {', '.join(sorted(names))}"
            )
        required = {
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        if missing := sorted(required - set(data)):
            raise ValueError(f"{cls.__name__}: missing required field(s) {', '.join(missing)}")
        kwargs = dict(data)
        for name, sub in cls._nested.items():
            if kwargs.get(name) is not None and not isinstance(kwargs[name], sub):
                kwargs[name] = sub.from_dict(kwargs[name])  # type: ignore[attr-defined]
        return cls(**kwargs)
