"""Run an app under uvicorn on a background thread, for tests and benchmarks.

The socket is bound here, before uvicorn starts, to port 0 by default: the system picks a free
port, so two runs never race for one, and the URL is known before the first request.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

STARTUP_TIMEOUT_S = 30.0


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (an OSError says why it could not bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it a keep-alive client waits ~40 ms per response (Nagle's algorithm + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening from now on: a client that connects before uvicorn has started waits in the
        # backlog instead of being refused (`gpt2 serve` logs its URL before the app starts).
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


@contextmanager
def running_server(app: ASGIApp, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` on a free port of ``host`` until the block ends; yields the base URL."""
    sock = bind(host)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if not _wait(lambda: server.started or not thread.is_alive(), STARTUP_TIMEOUT_S):
            raise RuntimeError(f"the server did not start within {STARTUP_TIMEOUT_S:.0f} s")
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting (see its log)")
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_TIMEOUT_S)
        sock.close()


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` every 10 ms until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
