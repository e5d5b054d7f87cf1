"""gRPC plumbing shared by every role: server with health and reflection, address
parsing, and the mapping of exceptions to status codes."""
from __future__ import annotations

import contextlib
import inspect

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.wire.security import NONE, Credentials

MAX_MESSAGE_BYTES = 64 << 20


class RpcError(Exception):
    """An error with the status the caller should see."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()):
        """trailers: trailing metadata the caller gets with the status (e.g. a retry hint)."""
        super().__init__(message)
        self.code, self.message, self.trailers = code, message, trailers


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "out of KV blocks"
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


# what handlers raise for a bad request or a known condition; anything else is a bug (INTERNAL)
EXPECTED = (RpcError, ValueError, MemoryError)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Ends a call whose handler raised one of EXPECTED with the status status_for gives:
    handlers raise, they do not catch and abort."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_unary(handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_stream(handler.unary_stream))
        return handler


def _unary(fn):
    async def call(request, context):
        try:
            return await fn(request, context)
        except EXPECTED as e:
            await _abort(context, e)
    return call


def _stream(fn):
    if not inspect.isasyncgenfunction(fn):
        return _unary(fn)  # a coroutine that writes with context.write

    async def stream(request, context):
        try:
            async with contextlib.aclosing(fn(request, context)) as responses:  # closed on any exit
                async for response in responses:
                    yield response
        except EXPECTED as e:
            await _abort(context, e)
    return stream


async def _abort(context, exc: BaseException) -> None:
    trailers = getattr(exc, "trailers", ())
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(*status_for(exc))


class ServerHandle:
    """A grpc.aio server with the standard health service (NOT_SERVING until ready()), the
    caller checks of its credentials (security.py) and the StatusInterceptor.
    Constructing it starts nothing; start() binds and serves."""

    def __init__(self, listen: str, service_names: list[str], max_receive_bytes: int = MAX_MESSAGE_BYTES,
                 options: tuple = (), creds: Credentials = NONE):
        """max_receive_bytes: larger messages are refused (RESOURCE_EXHAUSTED) before any handler runs;
        options: more grpc server options (a coordinator worker's ("grpc.so_reuseport", 1));
        creds: TLS to serve and what callers must show (none: plain, open)."""
        self.listen = listen
        self.service_names = service_names
        self.creds = creds
        auth = creds.interceptor()
        self.server = grpc.aio.server(interceptors=[*([auth] if auth else []), StatusInterceptor()],
                                      options=[("grpc.max_receive_message_length", max_receive_bytes),
                                               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *options])
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0

    async def start(self) -> str:
        reflection.enable_server_reflection(self.service_names + [reflection.SERVICE_NAME, "grpc.health.v1.Health"],
                                            self.server)
        self.port = self.creds.bind(self.server, self.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await self.server.start()
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        return self.address

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def ready(self) -> None:
        await self._set(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace_s: float) -> None:
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)

    async def _set(self, status) -> None:
        for name in ["", *self.service_names]:
            r = self.health.set(name, status)
            if r is not None and hasattr(r, "__await__"):
                await r


def channel(address: str, creds: Credentials = NONE, max_backoff_s: float | None = None,
            own_connection: bool = False) -> grpc.aio.Channel:
    """A channel to a cluster member or coordinator, with creds' TLS, secret and API key.
    max_backoff_s: cap gRPC's reconnect backoff (default up to 120 s), so that a peer that
    comes back after a long outage is reached again within that time. own_connection: a TCP
    connection of its own (gRPC otherwise shares one between a process's channels to the
    same address), as separate clients would have."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if max_backoff_s is not None:
        ms = max(100, int(max_backoff_s * 1000))
        options += [("grpc.initial_reconnect_backoff_ms", min(ms, 1000)), ("grpc.min_reconnect_backoff_ms", min(ms, 1000)),
                    ("grpc.max_reconnect_backoff_ms", ms)]
    return creds.channel(address, options)
