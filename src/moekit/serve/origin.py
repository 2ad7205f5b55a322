"""Who may reach the server from a web browser: the Host and Origin checks, and CORS.

A server on a developer's machine is reachable by every web page its user opens. Two guard
checks keep those pages out, with or without an API key:

- Host (DNS rebinding: a page whose domain is made to resolve to 127.0.0.1 reaches the server
  as a same-origin page, with its own name in the Host header): a request is answered only when
  its Host names an IP address (a rebinding page always has a name, never an address, since a
  page cannot be served from an address it does not own), a loopback name (localhost,
  *.localhost) or one of `allowed_hosts` ("*" for any). Every IP address, not just the one the
  server is bound to, so that port forwarding (containers, NAT) keeps working; a server bound
  to 0.0.0.0 and reached by a DNS name needs that name in `allowed_hosts`.
- Origin (a cross-site request, including a "simple" POST with a text/plain body that no
  preflight announces): a request that carries an Origin is answered only when that is the
  server's own page (the Origin's host and port are the Host's) or one of `allowed_origins`
  ("*" for any).

For `allowed_origins` the server speaks CORS: it answers their preflight OPTIONS requests
(without asking for the API key, which a preflight never carries) and adds the
Access-Control-* headers to every response, streaming ones included.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from moekit.serve.config import ServerConfig, is_ip_literal
from moekit.serve.protocol import APIError

METHODS = "GET, POST, OPTIONS"
PREFLIGHT_MAX_AGE_S = 600
EXPOSED = "Retry-After"  # what a page may read of a response beyond the basic headers


def host_name(host: str) -> str:
    """The name in a Host header (or an Origin's netloc), without its port, lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0].rstrip(".")


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    """Whether a server with `allowed` hosts answers to the host `name`."""
    if is_ip_literal(name) or name == "localhost" or name.endswith(".localhost"):
        return True
    return any(
        pattern in ("*", name) or (pattern.startswith("*.") and name.endswith(pattern[1:]))
        for pattern in allowed
    )


def check_host(request: Request, config: ServerConfig) -> APIError | None:
    """A guard check: the 403 for a Host this server does not answer to, else None. A request
    without a Host header (HTTP/1.0) passes: browsers always send one."""
    host = request.headers.get("host")
    if host is None or host_allowed(host_name(host), config.allowed_hosts):
        return None
    return APIError(
        403,
        f"this server does not answer to the host {host_name(host)!r}: only to IP addresses, "
        "loopback names and its allowed hosts (a defence against DNS rebinding)",
        code="host_not_allowed",
    )


def cross_origin(request: Request, config: ServerConfig) -> str | None:
    """The request's Origin when it is one of `config.allowed_origins`, for CORS; else None
    (no Origin, the server's own page, or an origin the Origin check refuses)."""
    origin = request.headers.get("origin")
    if origin is None or same_origin(origin, request):
        return None
    allowed = config.allowed_origins
    return origin if "*" in allowed or origin.lower().rstrip("/") in allowed else None


def same_origin(origin: str, request: Request) -> bool:
    """Whether `origin` is the server's own page: its host and port are the request's Host
    (which the Host check has vetted). The scheme is not compared: behind a proxy that ends
    TLS the page is https and the server sees http."""
    host = request.headers.get("host")
    netloc = urlsplit(origin.strip().lower()).netloc
    return host is not None and netloc != "" and netloc == host.strip().lower()


def check_origin(request: Request, config: ServerConfig) -> APIError | None:
    """A guard check: the 403 for a request from a web page that is neither the server's own
    nor one of its allowed origins, else None."""
    origin = request.headers.get("origin")
    if origin is None or same_origin(origin, request) or cross_origin(request, config):
        return None
    return APIError(
        403,
        f"requests from web pages at {origin!r} are not allowed: only from this server's own "
        "page and its allowed origins",
        code="origin_not_allowed",
    )


def is_preflight(request: Request) -> bool:
    """Whether the request is a browser's CORS preflight."""
    headers = request.headers
    return (
        request.method == "OPTIONS"
        and "origin" in headers
        and "access-control-request-method" in headers
    )


def preflight_response(request: Request, config: ServerConfig) -> Response | None:
    """The answer to a preflight from an allowed origin (which the Origin check let through),
    or None for any other request."""
    origin = cross_origin(request, config)
    if origin is None or not is_preflight(request):
        return None
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": METHODS,
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
    wanted = request.headers.get("access-control-request-headers")
    if wanted:  # the origin is trusted: any header it asks for (OpenAI's clients send many)
        headers["Access-Control-Allow-Headers"] = wanted
    return Response(status_code=204, headers=headers)


def cors_headers(request: Request, config: ServerConfig) -> list[tuple[bytes, bytes]]:
    """The Access-Control-* headers for a response to `request` (none when it does not come
    from an allowed origin)."""
    origin = cross_origin(request, config)
    if origin is None:
        return []
    return [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-expose-headers", EXPOSED.encode()),
        (b"vary", b"Origin"),
    ]
