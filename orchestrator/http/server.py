"""The HTTP server of one frontend: uvicorn serving the API as a task on the frontend actor's event loop, next
to its gRPC server (Ray Serve's proxy actor runs its HTTP server the same way)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from orchestrator.frontend import Frontend

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn, minus signal handling: the actor's process belongs to Ray, which handles its signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:      # older uvicorn
        pass


class HttpServer:
    def __init__(self, frontend: "Frontend", host: str, port: int):
        self.frontend, self.host, self.port = frontend, host, port
        self.server: _Server | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind (a port in use is an error here, naming it), start serving, return the port."""
        from orchestrator.http.app import build_app

        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise RuntimeError(f"cannot listen for HTTP on {self.host}:{self.port} ({e.strerror}); is the port "
                               f"in use? pick another with --http-port (0 picks a free one)") from None
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        security = self.frontend.config.security
        tls = {}
        if security.tls_cert:
            tls = dict(ssl_certfile=security.tls_cert, ssl_keyfile=security.tls_key)
            if security.tls_client_ca:
                tls.update(ssl_ca_certs=security.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(build_app(self.frontend), lifespan="off", access_log=False, log_level="warning",
                                timeout_graceful_shutdown=int(STOP_TIMEOUT_S), **tls)
        self.server = _Server(config)
        self.task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        waited = 0.0
        while not self.server.started:
            if self.task.done():
                raise RuntimeError(f"the HTTP server on port {self.port} failed to start: {self.task.exception()!r}")
            if waited > START_TIMEOUT_S:
                raise RuntimeError(f"the HTTP server on port {self.port} did not start within {START_TIMEOUT_S} s")
            await asyncio.sleep(0.01)
            waited += 0.01
        log.info("HTTP (OpenAI API, /metrics) listening on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self.server is None or self.task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), STOP_TIMEOUT_S + 1)
        except asyncio.TimeoutError:
            log.warning("the HTTP server did not stop within %.0f s; cancelling it", STOP_TIMEOUT_S + 1)
            self.task.cancel()
        except Exception as e:  # noqa: BLE001 - stopping anyway
            log.warning("the HTTP server stopped with %r", e)
        self.server = None
