"""Every credential a process holds, and the one place gRPC channels and servers get them.

Three kinds of caller and what each must show (once configured; all open by default on loopback):
- cluster members (coordinator, its workers, nodes) calling the node APIs (Coordinator:
  Register, Heartbeat; PrefillNode, DecodeNode, Supervisor): the cluster join secret in
  metadata `pdserve-cluster-secret`, and under mutual TLS a certificate whose URI SAN is
  pdserve://member;
- clients calling Generation: an API key (`authorization: Bearer KEY`), and under mutual TLS
  any certificate of the cluster's CA;
- anyone: the health service and reflection (readiness probes).
Anything else ends UNAUTHENTICATED before a handler runs. A certificate that does not chain
to the CA is refused in the TLS handshake (the caller sees UNAVAILABLE, the server keeps
nothing). A member that would listen on a non-loopback address with neither TLS nor a
secret refuses to start unless --insecure."""
from __future__ import annotations

import hmac
import inspect
import ipaddress
import logging
import socket
from dataclasses import dataclass, field

import grpc

from pdserve.common.config import ClientConfig, SecurityConfig, TLSConfig

log = logging.getLogger("pdserve.security")

SECRET_HEADER = "pdserve-cluster-secret"
API_KEY_HEADER = "authorization"
MEMBER_URI, CLIENT_URI = "pdserve://member", "pdserve://client"
MEMBER_SERVICES = ("pdserve.v1.Coordinator", "pdserve.v1.PrefillNode", "pdserve.v1.DecodeNode",
                   "pdserve.v1.Supervisor")
CLIENT_SERVICES = ("pdserve.v1.Generation",)
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def read_secret(path: str | None) -> bytes | None:
    """A secret file's first line, stripped (an empty file is an error, not 'no secret')."""
    data = _read(path)
    if data is None:
        return None
    line = data.strip().splitlines()[0].strip() if data.strip() else b""
    if not line:
        raise ValueError(f"{path} holds no secret")
    return line


def read_api_keys(key: str | None, path: str | None) -> frozenset[str]:
    """The API keys a server accepts: --api-key plus every line of --api-key-file (# comments)."""
    keys = {key} if key else set()
    if path:
        with open(path, encoding="utf-8") as f:
            keys.update(k for k in (line.split("#", 1)[0].strip() for line in f) if k)
        if not keys:
            raise ValueError(f"{path} holds no API key")
    return frozenset(keys)


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]") if ":" in listen else listen
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


@dataclass
class Credentials:
    """One process's credentials, loaded once from its config files."""
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    server_name: str | None = None
    secret: bytes | None = None          # the cluster join secret (members)
    api_keys: frozenset[str] = frozenset()  # accepted from clients (a coordinator)
    api_key: str | None = None           # sent to a server (a client)
    insecure: bool = False
    client_auth: bool = True             # a server with a CA requires client certificates
    _client_md: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        md = []
        if self.secret:
            md.append((SECRET_HEADER, self.secret.decode()))
        if self.api_key:
            md.append((API_KEY_HEADER, f"Bearer {self.api_key}"))
        self._client_md = tuple(md)

    @classmethod
    def member(cls, cfg: SecurityConfig, api_key: str | None = None,
               api_key_file: str | None = None) -> "Credentials":
        """A cluster member's (api_key/api_key_file: those a coordinator accepts from clients)."""
        return cls(**_tls(cfg), secret=read_secret(cfg.cluster_secret_file), insecure=cfg.insecure,
                   api_keys=read_api_keys(api_key, api_key_file), client_auth=cfg.tls_client_auth)

    @classmethod
    def client(cls, cfg: ClientConfig) -> "Credentials":
        key = cfg.api_key or (read_secret(cfg.api_key_file).decode() if cfg.api_key_file else None)
        return cls(**_tls(cfg), api_key=key)

    @property
    def tls(self) -> bool:
        return self.cert is not None or self.ca is not None

    @property
    def mutual(self) -> bool:
        """A server that requires client certificates."""
        return self.ca is not None and self.cert is not None and self.client_auth

    def check_listen(self, listen: str, what: str) -> None:
        """Refuse a non-loopback listener without credentials (unless --insecure)."""
        if is_loopback(listen) or self.tls or self.secret:
            return
        if not self.insecure:
            raise ValueError(f"{what} would listen on {listen} with neither TLS (--tls-cert/--tls-key) nor a "
                             f"cluster secret (--cluster-secret-file): anyone who can reach it could join the "
                             f"cluster or read its traffic; give credentials, or --insecure to do it anyway")
        log.warning("%s listens on %s without TLS or a cluster secret (--insecure)", what, listen)

    def check_http_listen(self, listen: str) -> None:
        """Refuse the HTTP API beyond loopback without API keys (its only client check) unless
        --insecure; it serves HTTPS where this process has a certificate."""
        if is_loopback(listen) or self.api_keys:
            return
        if not self.insecure:
            raise ValueError(f"the HTTP API would listen on {listen} without an API key (--api-key or "
                             f"--api-key-file): anyone who can reach it could use the cluster; give one, or "
                             f"--insecure to do it anyway")
        log.warning("the HTTP API listens on %s without an API key (--insecure)", listen)

    # servers

    def bind(self, server: grpc.aio.Server, listen: str) -> int:
        if self.cert is None:
            if self.ca is not None:
                raise ValueError("a server needs --tls-cert and --tls-key to serve TLS (--tls-ca alone is a client's)")
            return server.add_insecure_port(listen)
        creds = grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca if self.mutual else None,
                                            require_client_auth=self.mutual)
        return server.add_secure_port(listen, creds)

    def interceptor(self) -> "AuthInterceptor | None":
        if not (self.secret or self.api_keys or self.mutual):
            return None
        return AuthInterceptor(self)

    # channels

    def _options(self, extra: list) -> list:
        opts = list(extra)
        if self.tls and self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)

    def channel(self, address: str, options: list) -> grpc.aio.Channel:
        """An aio channel that sends this process's secret / API key with every call."""
        interceptors = _metadata_interceptors(self._client_md) if self._client_md else None
        if self.tls:
            return grpc.aio.secure_channel(address, self._channel_credentials(), options=self._options(options),
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)

    def sync_channel(self, address: str, options: list | None = None) -> grpc.Channel:
        """A blocking channel (CLI clients); calls on it pass metadata() themselves."""
        if self.tls:
            return grpc.secure_channel(address, self._channel_credentials(), options=self._options(options or []))
        return grpc.insecure_channel(address, options=options or [])

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._client_md


def _tls(cfg: TLSConfig) -> dict:
    return {"cert": _read(cfg.tls_cert), "key": _read(cfg.tls_key), "ca": _read(cfg.tls_ca),
            "server_name": cfg.tls_server_name}


NONE = Credentials()  # loopback, no credentials (the default)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the caller's credentials for the service it calls, before any handler runs."""

    def __init__(self, creds: Credentials):
        self.creds = creds

    async def intercept_service(self, continuation, details):
        service = details.method.lstrip("/").split("/", 1)[0]
        if service in OPEN_SERVICES:
            return await continuation(details)
        md = dict(details.invocation_metadata or ())
        if service in MEMBER_SERVICES:
            error = self._member_error(md)
        elif service in CLIENT_SERVICES:
            error = self._client_error(md)
        else:
            error = f"unknown service {service}"
        handler = await continuation(details)
        if error:
            return _refusal(handler, error)
        if service in MEMBER_SERVICES and self.creds.mutual:
            return _checked(handler, self.creds)
        return handler

    def _member_error(self, md: dict) -> str:
        secret = self.creds.secret
        if secret is not None:
            given = md.get(SECRET_HEADER, "")
            if not hmac.compare_digest(given.encode() if isinstance(given, str) else given, secret):
                return "this call needs the cluster join secret (--cluster-secret-file)" if not given else \
                    "wrong cluster join secret"
        return ""

    def _client_error(self, md: dict) -> str:
        keys = self.creds.api_keys
        if not keys:
            return ""
        given = md.get(API_KEY_HEADER, "")
        given = given.removeprefix("Bearer ").strip() if isinstance(given, str) else ""
        if not given:
            return "missing API key (metadata `authorization: Bearer KEY`)"
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            return "invalid API key"
        return ""


def member_identity_error(context) -> str:
    """Under mutual TLS: '' if the caller's certificate names a cluster member, else why not."""
    uris = context.auth_context().get("peer_uri", [])
    if MEMBER_URI.encode() not in uris:
        return f"this call needs a cluster member's certificate ({MEMBER_URI}); the caller's names " \
               f"{', '.join(u.decode() for u in uris) or 'no role'}"
    return ""


def _checked(handler, creds: Credentials):
    """The handler, run only for a caller whose certificate names a cluster member."""
    if handler is None:
        return None
    if handler.unary_unary is not None:
        fn = handler.unary_unary

        async def unary(request, context):
            error = member_identity_error(context)
            if error:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, error)
            return await fn(request, context)
        return handler._replace(unary_unary=unary)
    if handler.unary_stream is not None:
        fn = handler.unary_stream

        async def stream(request, context):
            error = member_identity_error(context)
            if error:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, error)
            if inspect.isasyncgenfunction(fn):
                async for item in fn(request, context):
                    yield item
            else:
                await fn(request, context)
        return handler._replace(unary_stream=stream)
    return handler


def _refusal(handler, error: str):
    """A handler of the same shape that ends the call UNAUTHENTICATED."""
    if handler is None:
        return None

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, error)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, error)
        yield  # pragma: no cover (an async generator, as the stream handler must be)

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary)
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=stream)
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=unary)
    return handler._replace(stream_stream=stream)


def _metadata_interceptors(md: tuple[tuple[str, str], ...]) -> list:
    def details(d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), *md)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, call_details, request):
            return await continuation(details(call_details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, call_details, request):
            return await continuation(details(call_details), request)

    return [UnaryUnary(), UnaryStream()]
