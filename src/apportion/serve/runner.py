"""Running an ASGI app with uvicorn: in the foreground (the CLI) or on a background thread on a free
port of 127.0.0.1 (tests, and anything that needs a server next to its own code)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


def uvicorn_config(app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0,
                   log_level: str = "warning") -> uvicorn.Config:
    """The fast configuration: no access log (one log line per request costs more than an instant
    backend's whole reply), loop and HTTP implementation left to uvicorn's "auto" (uvloop and
    httptools where installed, asyncio and h11 otherwise)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          loop="auto", http="auto", lifespan="off")


def serve(app: ASGIApp, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (Ctrl-C / SIGTERM stop it cleanly)."""
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level)).run()


def wait_until_up(base_url: str, process: subprocess.Popen[Any] | None = None, *, timeout_s: float = 60.0,
                  poll_s: float = 0.05) -> None:
    """Return once ``GET {base_url}/models`` answers 200; raise RuntimeError if ``process`` (the
    server, when it runs in one) exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before answering")
        try:
            if httpx.get(f"{base_url}/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {base_url} did not answer within {timeout_s:.0f} s")
        time.sleep(poll_s)


def bind_free_port(host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on a port the OS chose: no race between picking a port and binding it.

    The protocol is named, not left 0: asyncio sets TCP_NODELAY only on sockets whose ``proto``
    says TCP, and without it each response (headers and body are separate writes) stalls about
    40 ms on Nagle's algorithm waiting for the client's delayed ACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(2048)
    return sock


class ServedApp:
    """``with ServedApp(app) as served: httpx.get(served.base_url + "/models")``.

    uvicorn runs on its own event loop in a daemon thread, so sync and async callers alike can
    talk to it; leaving the block shuts it down gracefully and waits for it."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        self._app = app
        self._host = host
        self._log_level = log_level
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("the server is not running (use ServedApp as a context manager)")
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> ServedApp:
        self._sock = bind_free_port(self._host)
        self._server = uvicorn.Server(uvicorn_config(self._app, host=self._host, log_level=self._log_level))
        server, sock = self._server, self._sock
        self._thread = threading.Thread(target=lambda: server.run(sockets=[sock]), name="apportion-served-app",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start on {self._host} within {_START_TIMEOUT_S} s")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT_S)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True  # open keep-alive connections would hold a graceful stop
                self._thread.join(_STOP_TIMEOUT_S)
        if self._sock is not None:
            self._sock.close()
        self._sock = self._server = self._thread = None

    def __enter__(self) -> ServedApp:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
