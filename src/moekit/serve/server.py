"""Running a server: the listen socket, the HTTP thread, the engine, and the signals.

`serve` binds the address before loading the model (a taken port fails at once), serves HTTP
with uvicorn in a background thread, and runs the engine in the main thread, where the heavy
work belongs (see Engine.run).

SIGTERM (what a service manager or Kubernetes sends) drains: new requests get a 503, the
queued and running ones finish, for at most `shutdown_grace` seconds, after which whatever is
left ends with "abort"; then the HTTP server sends the last answers and `serve` returns. A
second SIGTERM, or Ctrl-C (SIGINT) at any time, stops at once: every queued and running
request is answered "abort".
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.serve.config import ConnectionLimits, SettingError
from moekit.serve.engine import DEFAULT_PREFILL_CHUNK

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from moekit.infer.offload import OffloadConfig
    from moekit.parallel.mesh import Parallel
    from moekit.serve.engine import Engine

HTTP_EXIT_WAIT_S = 10  # for the HTTP server to send the last answers once the engine stopped
DEFAULT_SHUTDOWN_GRACE_S = 30.0  # as long as Kubernetes waits after SIGTERM by default


class PortInUseError(ValueError):
    """The address `moekit serve` was asked to listen on is taken. A ValueError, so that the
    command line reports it as a usage error (exit code 2) rather than a crash."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or a clear error when that address is taken
    (PortInUseError) or cannot be used (ValueError)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise ValueError(f"cannot serve on host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restart must not wait for the old connections' TIME_WAIT to expire.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} on {host} is in use; stop whatever listens there or serve on "
                "another port"
            ) from None
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_tokens_limit: int | None = None,
    max_context: int | None = None,
    device: str | None = "auto",
    on_ready: Callable[[], None] | None = None,
    limits: ConnectionLimits | None = None,
    allowed_hosts: str | Sequence[str] = (),
    allowed_origins: str | Sequence[str] = (),
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_S,
    offload: OffloadConfig | None = None,
    parallel: Parallel | None = None,
    tool_call_format: str | None = None,
    prefix_cache_tokens: int | None = None,
    speculative_tokens: int = 0,
    draft_dir: str | Path | None = None,
    compile: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> None:
    """Serve a model directory over HTTP until interrupted (an OpenAI-compatible API at
    http://HOST:PORT/v1 and a playground page at http://HOST:PORT/). `max_context` bounds
    prompt plus new tokens per request and sizes each batch slot's KV cache (default: the
    model's max_seq_len, at most 4096). The model runs on `device` ("auto": CUDA when present,
    else the CPU). `on_ready` is called once the server accepts requests. `limits` bounds what
    a connection may do (default ConnectionLimits(): a request head within 10 s, its body
    within 30 s, at most 256 connections open); `allowed_hosts` and `allowed_origins` open the
    server to other host names and to web pages (see ServerConfig). `prefill_chunk`: prompt
    tokens prefilled between two decode steps (0: whole prompts at once, stalling the running
    streams). SIGTERM drains: new requests get a 503 while the queued and running ones
    finish, for at most `shutdown_grace` seconds; a second SIGTERM or Ctrl-C stops at once.
    `offload` pages the experts under a memory budget (moekit.infer.offload); `parallel`
    (the main process of a torchrun) splits the experts over its processes.
    `tool_call_format` names the format the model writes tool calls in (None: the one its
    chat template shows; see moekit.infer.tool_calls).
    `prefix_cache_tokens`: prompt tokens kept for reuse by later prompts that start the same
    way (None: a quarter of max_batch x max_context; 0: off). `speculative_tokens`:
    prompt-lookup drafts per request and decode step (0: off; moekit.serve.speculate), or a draft
    model's, from `draft_dir` (moekit.serve.draft). With `compile`, decode steps run through
    `torch.compile` (moekit.serve.compiled_step), compiled before the server takes requests;
    `on_progress` hears how that goes. Raises
    PortInUseError when the port is taken, a ValueError for a setting that cannot work."""
    # long function: one keyword per server setting, each passed through to build()
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError("moekit serve needs FastAPI and uvicorn: pip install 'moekit[serve]'")
    if (
        isinstance(shutdown_grace, bool)
        or not isinstance(shutdown_grace, int | float)
        or not 0 <= shutdown_grace < float("inf")
    ):
        raise SettingError("shutdown_grace", shutdown_grace, "must be a number of seconds >= 0")
    from moekit.serve.app import build

    sock = listen_socket(host, port)  # before loading the model: fail fast
    try:
        app, engine = build(
            model_dir,
            api_key=api_key,
            model_name=model_name,
            max_batch=max_batch,
            max_queue=max_queue,
            max_tokens_limit=max_tokens_limit,
            max_context=max_context,
            device=device,
            allowed_hosts=allowed_hosts,
            allowed_origins=allowed_origins,
            prefill_chunk=prefill_chunk,
            offload=offload,
            parallel=parallel,
            tool_call_format=tool_call_format,
            prefix_cache_tokens=prefix_cache_tokens,
            speculative_tokens=speculative_tokens,
            draft_dir=draft_dir,
            compile=compile,
        )
        if engine.compiled is not None:
            engine.compiled.warm_up(on_progress)
    except BaseException:
        sock.close()
        raise
    server = http_server(app, host, port, limits)
    http = _start_http(server, sock, f"{host}:{port}")
    if on_ready is not None:
        on_ready()

    def stop_engine_when_http_ends() -> None:
        http.join()
        engine.stop()

    threading.Thread(target=stop_engine_when_http_ends, name="moekit-watch", daemon=True).start()
    with _sigterm_drains(engine, shutdown_grace):
        try:
            engine.run()  # the heavy work stays in the main thread (see Engine.run)
        except KeyboardInterrupt:
            pass
        finally:  # the engine has answered every request; let the server send the answers
            server.should_exit = True
            http.join(timeout=HTTP_EXIT_WAIT_S)


def http_server(
    app: FastAPI, host: str, port: int, limits: ConnectionLimits | None = None
) -> uvicorn.Server:
    """The uvicorn server for `app`: what a connection may do is set here (`limits`, default
    ConnectionLimits(); see connections.py), counted in the app's metrics when it has them."""
    import uvicorn

    from moekit.serve.connections import protocol_class
    from moekit.serve.metrics import ConnectionStats

    state = getattr(app.state, "moekit", None)
    stats = state.metrics.connections if state is not None else ConnectionStats()
    http = protocol_class(limits or ConnectionLimits(), stats)
    # No WebSocket routes: without ws="none" an upgrade would hand the connection to another
    # protocol, outside the deadlines and the count.
    config = uvicorn.Config(app, host=host, port=port, http=http, ws="none", log_level="warning")
    return uvicorn.Server(config)


def _start_http(server: uvicorn.Server, sock: socket.socket, address: str) -> threading.Thread:
    """Run `server` on `sock` in a background thread; return once it accepts connections."""
    http = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="moekit-http", daemon=True
    )
    http.start()
    while not server.started:  # the engine runs only once the server does
        http.join(timeout=0.05)
        if not http.is_alive():
            sock.close()
            raise RuntimeError(f"the HTTP server on {address} failed to start")
    return http


@contextlib.contextmanager
def _sigterm_drains(engine: Engine, grace_s: float) -> Iterator[None]:
    """While inside, the first SIGTERM drains `engine` (see Engine.drain) and a second one
    raises KeyboardInterrupt in the main thread, as Ctrl-C does. Outside the main thread
    signals cannot be handled, and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        if not engine.accepting:
            raise KeyboardInterrupt
        # Not here: a handler runs between two bytecodes of the main thread, which may hold
        # the engine's lock that `drain` takes.
        threading.Thread(target=engine.drain, args=(grace_s,), name="moekit-drain").start()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
