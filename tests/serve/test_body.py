"""Reading a body: JSON, and the size limit while it streams in (no Content-Length)."""

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from moekit.serve.body import read_json
from moekit.serve.protocol import APIError


async def echo(request):
    try:
        return JSONResponse({"got": await read_json(request, 16)})
    except APIError as e:
        return JSONResponse(e.body(), status_code=e.status)


client = TestClient(Starlette(routes=[Route("/", echo, methods=["POST"])]))


def chunked(*parts):
    yield from parts  # a generator body is sent chunked, with no Content-Length


def test_json_is_decoded_and_an_empty_body_is_null():
    assert client.post("/", content=b'{"a": [1]}').json() == {"got": {"a": [1]}}
    assert client.post("/", content=b"").json() == {"got": None}
    r = client.post("/", content=b"\xff\xfe")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_body_is_refused_once_it_grows_past_the_limit():
    assert client.post("/", content=chunked(b'{"a":', b" 1}")).json() == {"got": {"a": 1}}
    r = client.post("/", content=chunked(b'{"a": "', b"x" * 10, b"x" * 10, b'"}'))
    assert r.status_code == 413 and "larger than 16 bytes" in r.json()["error"]["message"]
