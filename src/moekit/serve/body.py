"""Reading a request body: its size limit and its JSON.

A body is refused as soon as it is known to be too large: up front when its Content-Length
says so (a guard check, before any of it is read), else while it streams in. JSON that Python
could decode only at a cost, or not at all, is a 400 like any other bad JSON: nesting deeper
than the decoder's recursion limit, and integers longer than MAX_INT_DIGITS digits (no field
needs more than 20; Python's own limit of 4300 would be a 500, and a long integer is slow to
convert and too large for any float).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from moekit.serve.config import ServerConfig
from moekit.serve.protocol import APIError

MAX_INT_DIGITS = 100


def too_large(limit: int) -> APIError:
    """The 413 for a body over `limit` bytes. It closes the connection: the rest of the body
    is never read (draining megabytes to keep the connection open would cost the server more
    than the client's reconnecting costs it)."""
    return APIError(
        413, f"the request body is larger than {limit} bytes", headers={"Connection": "close"}
    )


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
        return json.loads(b"".join(chunks) or b"null", parse_int=_parse_int)
    except RecursionError:
        raise APIError(400, "the request body is JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise APIError(
            400,
            f"the request body has an integer of {digits} digits; at most {MAX_INT_DIGITS} "
            "are accepted",
        )
    return int(text)
