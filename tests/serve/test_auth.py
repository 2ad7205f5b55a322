"""The API key, and the cookie that lets a browser load the playground."""

import httpx
import pytest

from .conftest import running_server

openai = pytest.importorskip("openai")


def test_api_key_guards_every_endpoint_but_health(tiny_model_dir):
    with running_server(tiny_model_dir, api_key="sesame") as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        for path in ("/", "/static/app.js", "/v1/models", "/metrics", "/v1/moekit/info"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer wrong"}
        assert httpx.get(f"{url}/v1/models", headers=wrong).status_code == 401
        assert httpx.get(f"{url}/?key=wrong").status_code == 401
        bearer = {"Authorization": "Bearer sesame"}
        assert httpx.get(f"{url}/static/app.js", headers=bearer).status_code == 200
        # A browser opens /?key=KEY; the cookie that sets lets it load the page's files, and
        # is not itself the key.
        with httpx.Client(base_url=url) as browser:
            page = browser.get("/?key=sesame")
            assert page.status_code == 200 and "moekit playground" in page.text
            cookie = page.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie and "sesame" not in cookie
            assert browser.get("/static/app.js").status_code == 200
            assert browser.get("/").status_code == 200
            assert browser.get("/v1/models").status_code == 401  # the API wants the key itself
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame")
        assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices


def request_to(path, *, query=b"", headers=(), cookie=None):
    from starlette.requests import Request

    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    if cookie is not None:
        raw.append((b"cookie", cookie.encode()))
    scope = {"type": "http", "method": "GET", "path": path, "query_string": query, "headers": raw}
    return Request(scope)


def test_who_is_authorized():
    from moekit.serve.auth import PAGE_COOKIE, authorized, page_token

    token = page_token("sesame")
    assert "sesame" not in token and token == page_token("sesame") != page_token("other")
    bearer = [("Authorization", "Bearer sesame")]
    assert authorized(request_to("/v1/models", headers=bearer), "sesame")
    assert not authorized(request_to("/v1/models", headers=[("Authorization", "sesame")]), "sesame")
    # The key in the query opens the page only; the cookie, the page and its files only.
    assert authorized(request_to("/", query=b"key=sesame"), "sesame")
    assert not authorized(request_to("/v1/models", query=b"key=sesame"), "sesame")
    cookie = f"{PAGE_COOKIE}={token}"
    assert authorized(request_to("/", cookie=cookie), "sesame")
    assert authorized(request_to("/static/app.js", cookie=cookie), "sesame")
    assert not authorized(request_to("/v1/models", cookie=cookie), "sesame")
    assert not authorized(request_to("/", cookie=f"{PAGE_COOKIE}=sesame"), "sesame")


def test_without_a_key_every_request_passes_and_health_always_does():
    from moekit.serve.auth import check_api_key
    from moekit.serve.config import ServerConfig

    assert check_api_key(request_to("/v1/models"), ServerConfig("tiny")) is None
    keyed = ServerConfig("tiny", api_key="sesame")
    assert check_api_key(request_to("/health"), keyed) is None
    problem = check_api_key(request_to("/metrics"), keyed)
    assert problem is not None and problem.status == 401 and problem.code == "invalid_api_key"
