"""What a server is told: the settings the HTTP layer reads, one object per app."""

from __future__ import annotations

from dataclasses import dataclass

MAX_BODY_BYTES = 1 << 20


@dataclass
class ServerConfig:
    """The served model's id (`model_name`), the API key (None: no key), the cap on a
    request's `max_tokens` (None: the engine's max_context), the largest request body, and
    the `Retry-After` seconds sent with a 429."""

    model_name: str
    api_key: str | None = None
    max_tokens_limit: int | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    retry_after_s: int = 1
