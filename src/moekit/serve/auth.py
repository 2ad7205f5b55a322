"""The API key: who may call the server.

With a key set, every endpoint but /health requires it as `Authorization: Bearer KEY` (and a
CORS preflight, which a browser sends without it: origin.py answers those). A
browser opens the playground as `/?key=KEY` once: that sets an HttpOnly cookie (a digest of
the key, not the key) that lets it load the page and the page's files, and the page sends the
key as a Bearer token on its API calls. Secrets are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request
from starlette.responses import Response

from moekit.serve.config import ServerConfig
from moekit.serve.origin import is_preflight
from moekit.serve.protocol import APIError

PAGE_COOKIE = "moekit_page"
OPEN_PATHS = frozenset({"/health"})  # what a load balancer probes, key or not


def page_token(api_key: str) -> str:
    """The playground cookie's value: proves the browser was given the key without being the
    key (a leaked cookie does not open the API)."""
    return hmac.new(api_key.encode(), b"moekit playground", hashlib.sha256).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """`given == expected`, in time that does not depend on where they differ."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def key_in_query(request: Request, key: str) -> bool:
    """Whether the request opens the page as `/?key=KEY`."""
    return request.url.path == "/" and same_secret(request.query_params.get("key", ""), key)


def authorized(request: Request, key: str) -> bool:
    """The Bearer key anywhere; for the playground also `/?key=KEY`, and the cookie that sets
    for the page and its files."""
    path = request.url.path
    if same_secret(request.headers.get("authorization", ""), f"Bearer {key}"):
        return True
    if key_in_query(request, key):
        return True
    page = path == "/" or path.startswith("/static/")
    return page and same_secret(request.cookies.get(PAGE_COOKIE, ""), page_token(key))


def check_api_key(request: Request, config: ServerConfig) -> APIError | None:
    """A guard check: the 401 for a request without the key, or None when it may pass."""
    key = config.api_key
    exempt = request.url.path in OPEN_PATHS or is_preflight(request)
    if key and not exempt and not authorized(request, key):
        return APIError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>' "
            "(in a browser, open /?key=<key>)",
            type="authentication_error",
            code="invalid_api_key",
        )
    return None


def set_page_cookie(request: Request, response: Response, config: ServerConfig) -> None:
    """On the page opened as `/?key=KEY`, set the cookie that lets the browser fetch the page's
    files; the page itself sends the key (which it reads from its URL) as a Bearer token on its
    API calls."""
    key = config.api_key
    if key and key_in_query(request, key):
        response.set_cookie(
            PAGE_COOKIE, page_token(key), httponly=True, samesite="strict", path="/"
        )
