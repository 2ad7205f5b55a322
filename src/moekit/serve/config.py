"""What a server is told: the settings the HTTP layer reads (ServerConfig, one object per app)
and what a connection may do (ConnectionLimits, read by the HTTP server). Both are checked when
they are made, so that a bad setting fails at start-up rather than on every request."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from moekit.infer.tool_calls import TOOL_PARSERS

MAX_BODY_BYTES = 1 << 20
HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*")


class SettingError(ValueError):
    """A server setting that cannot work; `setting` names it (as the Python keyword)."""

    def __init__(self, setting: str, value: object, allowed: str) -> None:
        super().__init__(f"{setting}={value!r} is invalid: {allowed}")
        self.setting = setting


def check_count(setting: str, value: object, *, none_ok: bool = False) -> None:
    """A SettingError unless `value` is an int >= 1 (or None, when `none_ok`)."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "must be an integer >= 1" + (" (or None: no cap)" if none_ok else "")
        raise SettingError(setting, value, allowed)


def check_seconds(setting: str, value: object) -> None:
    """A SettingError unless `value` is a positive number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SettingError(setting, value, "must be a positive number of seconds")


@dataclass
class ServerConfig:
    """The served model's id (`model_name`), the API key (None: no key), the cap on a
    request's `max_tokens` (None: the engine's max_context), the largest request body, the
    `Retry-After` seconds sent with a 429, the host names the server answers to besides its
    own addresses and loopback names (`allowed_hosts`: "*" for any, "*.example.com" for a
    domain's hosts), and the web origins whose pages may call the API (`allowed_origins`,
    "scheme://host[:port]" or "*": CORS is enabled for them), and the format the model writes
    tool calls in (`tool_call_format`, see moekit.infer.tool_calls; None: the one its chat
    template shows)."""

    model_name: str
    api_key: str | None = None
    max_tokens_limit: int | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    retry_after_s: int = 1
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    tool_call_format: str | None = None  # None: the one the chat template shows

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise SettingError("model_name", self.model_name, "must be a non-empty string")
        check_count("max_tokens_limit", self.max_tokens_limit, none_ok=True)
        check_count("max_body_bytes", self.max_body_bytes)
        check_count("retry_after_s", self.retry_after_s)
        hosts = _strings("allowed_hosts", self.allowed_hosts)
        self.allowed_hosts = tuple(_host_pattern(h) for h in hosts)
        self.allowed_origins = tuple(
            _origin(o) for o in _strings("allowed_origins", self.allowed_origins)
        )
        if self.tool_call_format is not None and self.tool_call_format not in TOOL_PARSERS:
            raise SettingError(
                "tool_call_format",
                self.tool_call_format,
                f"must be one of {', '.join(TOOL_PARSERS)}",
            )


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    """What one connection may do: send its request head within `header_timeout_s` of
    opening (or of its first byte, for a further request on a kept-alive connection), its
    body within `body_timeout_s` of the head, and be one of at most `max_connections` open at
    once (past that, a new connection is answered 503 and closed)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        check_seconds("header_timeout_s", self.header_timeout_s)
        check_seconds("body_timeout_s", self.body_timeout_s)
        check_count("max_connections", self.max_connections)


def listed(values: str | Iterable[str]) -> tuple[str, ...]:
    """`values` as a tuple; one string is one value, not a list of its letters."""
    return (values,) if isinstance(values, str) else tuple(values)


def _strings(setting: str, values: str | Iterable[str]) -> list[str]:
    values = listed(values)
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise SettingError(setting, list(values), "must be a list of non-empty strings")
    return [v.strip() for v in values]


def _host_pattern(host: str) -> str:
    """A host name, "*.domain" or "*", lower-cased. IP literals need no entry (the server
    answers to every IP address) but are accepted."""
    name = host.lower().rstrip(".")
    if name == "*" or is_ip_literal(name) or HOST_NAME.fullmatch(name):
        return name
    raise SettingError(
        "allowed_hosts", host, "each must be a host name (no scheme or port), *.domain or *"
    )


def _origin(origin: str) -> str:
    """An origin as browsers send it: "scheme://host[:port]", lower-cased, or "*"."""
    if origin == "*":
        return origin
    parts = urlsplit(origin.lower().rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        raise SettingError(
            "allowed_origins", origin, "each must be scheme://host[:port] (http or https), or *"
        )
    return f"{parts.scheme}://{parts.netloc}"


def is_ip_literal(name: str) -> bool:
    """Whether `name` is an IPv4 or IPv6 address (IPv6 with or without brackets)."""
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True
