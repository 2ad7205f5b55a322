"""Reading a request body: its size limit and its JSON.

A body is refused as soon as it is known to be too large: up front when its Content-Length
says so (a guard check, before any of it is read), else while it streams in.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from moekit.serve.config import ServerConfig
from moekit.serve.protocol import APIError


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes")


def check_content_length(request: Request, config: ServerConfig) -> APIError | None:
    """A guard check: the 413 for a body that declares itself too large, else None."""
    size = request.headers.get("content-length")
    limit = config.max_body_bytes
    if size is not None and size.isdigit() and int(size) > limit:
        return too_large(limit)
    return None


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body decoded as JSON (None when empty); a 413 APIError past `max_bytes` bytes, a 400
    when it is not JSON."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
