"""Structured output in the API: the request fields that constrain a generation, read into one
compiled `Grammar` (moekit.infer.constrain) or a 400 that names the field and the problem.

The fields, on /v1/chat/completions and /v1/completions alike:
- OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"},
  {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}};
- vLLM's `guided_json` (a schema, or its JSON text), `guided_regex`, `guided_choice`,
  `guided_grammar`;
- vLLM's `structured_outputs`: {"json": ...} | {"regex": ...} | {"choice": [...]} |
  {"grammar": ...} | {"json_object": true}.
A request sets at most one of them. They are read from the body's extra fields (the request
models accept unknown fields), so the request models stay as they are.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from moekit.infer.constrain import ConstraintError, Grammar, compile_constraint
from moekit.serve.protocol import STRUCTURED_FIELDS, APIError

FIELDS = STRUCTURED_FIELDS
_GUIDED = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
# structured_outputs options that change nothing here: the output is always compact JSON with
# the schema's own additionalProperties, and there is one backend.
_HARMLESS = {"disable_fallback", "disable_any_whitespace", "backend"}


def _bad(param: str, message: str) -> APIError:
    message = f"invalid value for {param!r}: {message}"
    return APIError(400, message, param=param, code="invalid_value")


def requested(body: Any) -> tuple[str, Any, str] | None:
    """The constraint a validated request asks for, as (kind, spec, field), or None."""
    extra = body.model_extra or {}
    if extra.get("guided_whitespace_pattern") is not None:
        raise _bad(
            "guided_whitespace_pattern",
            "is not supported by this server (JSON is generated without whitespace)",
        )
    given = [name for name in FIELDS if extra.get(name) is not None]
    if "response_format" in given and _is_text(extra["response_format"]):
        given.remove("response_format")
    if len(given) > 1:
        raise APIError(
            400,
            f"{' and '.join(repr(g) for g in given)} each constrain the output; set only one",
            param=given[1],
            code="invalid_value",
        )
    if not given:
        return None
    name = given[0]
    value = extra[name]
    if name == "response_format":
        return _response_format(value)
    if name == "structured_outputs":
        return _structured_outputs(value)
    kind = _GUIDED[name]
    if kind == "json_schema":
        value = _schema(value, name)
    return kind, value, name


def _is_text(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == "text"


def _response_format(value: Any) -> tuple[str, Any, str]:
    param = "response_format"
    if not isinstance(value, dict):
        raise _bad(param, "must be an object with a 'type'")
    kind = value.get("type")
    if kind == "json_object":
        return "json_object", None, param
    if kind != "json_schema":
        raise _bad(param, f"type {kind!r} is not supported (text, json_object or json_schema)")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad(param, "'json_schema' must be an object with a 'schema'")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise _bad(param, "'json_schema.name' must be a string")
    if spec.get("schema") is None:
        raise _bad(param, "'json_schema.schema' is missing: give the JSON Schema to follow")
    return "json_schema", _schema(spec["schema"], param), param


def _structured_outputs(value: Any) -> tuple[str, Any, str]:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise _bad(param, "must be an object")
    unknown = sorted(set(value) - set(_OUTPUTS) - _HARMLESS - {"json_object"})
    if unknown:
        raise _bad(param, f"{', '.join(repr(u) for u in unknown)} is not supported by this server")
    chosen = [k for k in (*_OUTPUTS, "json_object") if value.get(k) not in (None, False)]
    if len(chosen) != 1:
        raise _bad(param, f"set exactly one of {', '.join([*_OUTPUTS, 'json_object'])}")
    key = chosen[0]
    if key == "json_object":
        return "json_object", None, param
    kind, spec = _OUTPUTS[key], value[key]
    if kind == "json_schema":
        spec = _schema(spec, param)
    return kind, spec, param


def _schema(value: Any, param: str) -> Any:
    """A schema given as an object, or as its JSON text (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _bad(param, f"the schema is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise _bad(param, "the JSON schema must be an object")
    return value


def compile_for(engine: Any, kind: str, spec: Any, *, ignore_eos: bool = False) -> Grammar:
    """A constraint compiled for `engine`'s tokenizer, end tokens and vocabulary. With
    `ignore_eos`, end-of-text is never allowed: only a complete output ends the request."""
    generator = engine.generator
    return compile_constraint(
        generator.tokenizer,
        kind,
        spec,
        eos_ids=set() if ignore_eos else generator.eos_ids,
        vocab_size=engine.cfg.vocab_size,
    )


async def grammar_for(body: Any, engine: Any) -> Grammar | None:
    """The compiled constraint of a request, for `engine`'s tokenizer and end tokens, or None.
    Compiled in a worker thread (a large schema takes a while); a bad one is a 400."""
    asked = requested(body)
    if asked is None:
        return None
    kind, spec, param = asked
    ignore_eos = bool(getattr(body, "ignore_eos", False))
    try:
        return await asyncio.to_thread(compile_for, engine, kind, spec, ignore_eos=ignore_eos)
    except ConstraintError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None
