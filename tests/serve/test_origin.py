"""Web pages and the server, on the real server over loopback: a page reached through DNS
rebinding or sending a cross-site request is refused before the engine sees it, with or
without an API key; the server's own page and the allowed origins (CORS) work."""

import contextlib
import http.server
import json
import threading

import httpx
import pytest

from .conftest import running_server

COMPLETION = {"model": "tiny", "prompt": "a", "max_tokens": 2}


def port_of(url):
    return int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def cors_server(tiny_model_dir):
    """A server with a key that lets one other web app call it, and answers to one name."""
    with running_server(
        tiny_model_dir,
        api_key="sesame",
        allowed_origins=["http://app.example:3000"],
        allowed_hosts=["models.example.lan"],
    ) as s:
        yield s


def test_a_rebound_host_name_is_refused_before_the_engine(server):
    url, engine = server
    port = port_of(url)
    prompts = engine.stats.prompt_tokens
    for host in (
        f"attacker.example:{port}",
        "attacker.example",
        f"localhost.attacker.example:{port}",
    ):
        # What a page at http://attacker.example:PORT sends once the name resolves to us.
        r = httpx.post(f"{url}/v1/completions", json=COMPLETION, headers={"Host": host})
        assert r.status_code == 403, host
        error = r.json()["error"]
        assert error["code"] == "host_not_allowed" and "attacker.example" in error["message"]
    assert engine.stats.prompt_tokens == prompts  # never reached the engine
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}",
                 f"api.localhost:{port}", f"192.168.1.20:{port}"):  # fmt: skip
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host


def test_a_cross_site_simple_post_is_refused_before_the_engine(server):
    url, engine = server
    prompts = engine.stats.prompt_tokens
    # A form or a no-cors fetch: text/plain, no preflight; the browser adds the Origin.
    r = httpx.post(
        f"{url}/v1/completions",
        content=json.dumps(COMPLETION),
        headers={"Content-Type": "text/plain", "Origin": "http://attacker.example"},
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in r.headers
    for origin in ("null", f"http://localhost:{port_of(url)}", "http://127.0.0.1:1"):
        r = httpx.post(f"{url}/v1/completions", json=COMPLETION, headers={"Origin": origin})
        assert r.status_code == 403, origin
    assert engine.stats.prompt_tokens == prompts
    own = {"Origin": f"http://127.0.0.1:{port_of(url)}"}  # the playground's own page
    assert httpx.post(f"{url}/v1/completions", json=COMPLETION, headers=own).status_code == 200


def test_allowed_origins_get_cors_with_the_key(cors_server):
    url, _ = cors_server
    app = {"Origin": "http://app.example:3000"}
    preflight = httpx.options(
        f"{url}/v1/chat/completions",
        headers={**app, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"},
    )  # fmt: skip
    assert preflight.status_code == 204  # no key needed: a preflight never carries one
    assert preflight.headers["access-control-allow-origin"] == "http://app.example:3000"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "x-stainless-os" in preflight.headers["access-control-allow-headers"]
    no_key = httpx.post(f"{url}/v1/completions", json=COMPLETION, headers=app)
    assert no_key.status_code == 401  # the key is still required, and the page may read why
    assert no_key.headers["access-control-allow-origin"] == "http://app.example:3000"
    keyed = {**app, "Authorization": "Bearer sesame"}
    body = {**COMPLETION, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=keyed) as r:
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://app.example:3000"
        assert list(r.iter_lines())[-2] == "data: [DONE]"
    other = {"Origin": "http://attacker.example", "Authorization": "Bearer sesame"}
    assert httpx.post(f"{url}/v1/completions", json=COMPLETION, headers=other).status_code == 403
    stranger = httpx.options(
        f"{url}/v1/completions",
        headers={"Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"},
    )
    assert stranger.status_code == 403 and "access-control-allow-origin" not in stranger.headers


def test_allowed_hosts_are_answered(cors_server):
    url, _ = cors_server
    bearer = {"Authorization": "Bearer sesame"}
    named = {**bearer, "Host": f"models.example.lan:{port_of(url)}"}
    assert httpx.get(f"{url}/v1/models", headers=named).status_code == 200
    other = {**bearer, "Host": "other.example.lan"}
    assert httpx.get(f"{url}/v1/models", headers=other).status_code == 403


def test_host_and_origin_rules():
    from moekit.serve.origin import host_allowed, host_name

    assert host_name("LocalHost:8000") == "localhost" and host_name("[::1]:80") == "[::1]"
    assert host_name("example.com.") == "example.com"
    assert (
        host_allowed("10.0.0.5", ())
        and host_allowed("[::1]", ())
        and host_allowed("a.localhost", ())
    )
    assert not host_allowed("localhost.evil.com", ()) and not host_allowed("evil.com", ())
    assert host_allowed("gpu.lab.example", ("*.lab.example",))
    assert not host_allowed("lab.example.evil", ("*.lab.example",))
    assert host_allowed("anything", ("*",))


def test_origin_settings_are_checked():
    from moekit.serve.config import ServerConfig, SettingError

    config = ServerConfig("tiny", allowed_origins="HTTP://App.Example:3000/", allowed_hosts="A.lan")
    assert config.allowed_origins == ("http://app.example:3000",)
    assert config.allowed_hosts == ("a.lan",)
    for bad in ("app.example", "ftp://app.example", "http://app.example/path"):
        with pytest.raises(SettingError, match="allowed_origins"):
            ServerConfig("tiny", allowed_origins=[bad])
    for bad in ("http://a.lan", "a.lan:8000", "a b"):
        with pytest.raises(SettingError, match="allowed_hosts"):
            ServerConfig("tiny", allowed_hosts=[bad])


@contextlib.contextmanager
def other_site():
    """A web site of its own on another loopback port (Chromium lets only loopback pages
    reach loopback servers): a blank page at its root. Yields its origin."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><title>another site</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


POST_AS_A_FORM = """url => fetch(url, {method: "POST", mode: "no-cors",
    headers: {"Content-Type": "text/plain"},
    body: JSON.stringify({model: "tiny", prompt: "a", max_tokens: 2})}).then(r => r.type)"""

POST_WITH_THE_KEY = """async url => {
    const r = await fetch(url, {method: "POST",
        headers: {"Authorization": "Bearer sesame", "Content-Type": "application/json"},
        body: JSON.stringify({model: "tiny", prompt: "a", max_tokens: 2})});
    return [r.status, await r.json()];
}"""


@pytest.mark.slow
def test_in_a_browser_only_allowed_pages_reach_the_engine(tiny_model_dir, browser):
    """Chromium itself: a page of another site posts to the server as a hostile page would
    (a no-cors text/plain fetch: no preflight) and is refused before the engine; a page of an
    allowed origin calls the API through CORS with the key and reads the answer."""
    with (
        other_site() as hostile,
        other_site() as friendly,
        running_server(tiny_model_dir, api_key="sesame", allowed_origins=[friendly]) as (
            url,
            engine,
        ),
    ):
        refused = 'moekit_requests_total{endpoint="/v1/completions",status="403"}'
        bearer = {"Authorization": "Bearer sesame"}
        page = browser.new_page()
        page.goto(hostile)
        prompts = engine.stats.prompt_tokens
        assert page.evaluate(POST_AS_A_FORM, f"{url}/v1/completions") == "opaque"
        text = httpx.get(f"{url}/metrics", headers=bearer).text
        assert f"{refused} 1" in text.splitlines()  # it reached the server, which refused it
        assert engine.stats.prompt_tokens == prompts
        page.goto(friendly)
        status, body = page.evaluate(POST_WITH_THE_KEY, f"{url}/v1/completions")
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        assert engine.stats.prompt_tokens > prompts
