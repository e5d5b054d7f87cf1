"""uvicorn serving the HTTP API on the frontend's own event loop, next to its gRPC server.
The socket is made here: with reuse_port, every worker of `pdserve coordinator --workers N`
binds the one port (the supervisor holds it reserved) and the kernel spreads connections."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import uvicorn

from pdserve.common.config import CoordinatorConfig
from pdserve.coordinator.http.app import build_app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the process's signals are run_until_signal's (drain, then close())


class HttpServer:
    def __init__(self, coordinator, cfg: CoordinatorConfig):
        self.cfg = cfg
        self.app = build_app(coordinator, cfg)
        self.server: _Server | None = None
        self.task: asyncio.Task | None = None

    async def start(self, reuse_port: bool) -> str:
        """Bind and serve; returns HOST:PORT (port 0 resolved)."""
        host, port = self.cfg.http_listen.rsplit(":", 1)
        bare = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((bare, int(port)))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, h11_max_incomplete_event_size=64 << 10,
                                **tls_options(self.cfg))
        self.server = _Server(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise OSError(f"the HTTP API could not start on {self.cfg.http_listen}")
            await asyncio.sleep(0.01)
        return f"{host}:{sock.getsockname()[1]}"

    @property
    def scheme(self) -> str:
        return "https" if self.cfg.security.tls_cert else "http"

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop accepting; streams still running get grace_s to end, then are cut."""
        if self.server is None:
            return
        self.server.config.timeout_graceful_shutdown = max(0.1, grace_s)
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self.task


def tls_options(cfg: CoordinatorConfig) -> dict:
    """HTTPS with the coordinator's gRPC certificate where it has one; under mutual TLS
    (--tls-ca, client auth on) clients show a certificate of the CA, as on gRPC."""
    sec = cfg.security
    if not sec.tls_cert:
        return {}
    mutual = bool(sec.tls_ca) and sec.tls_client_auth
    return dict(ssl_certfile=sec.tls_cert, ssl_keyfile=sec.tls_key, ssl_ca_certs=sec.tls_ca if mutual else None,
                ssl_cert_reqs=ssl.CERT_REQUIRED if mutual else ssl.CERT_NONE)
