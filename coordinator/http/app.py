"""The HTTP API's routes (FastAPI): the OpenAI endpoints, health, readiness, metrics.
A request body is checked whole (protocol.py) before anything runs; each of its
choices then runs through the coordinator's request path (calls.py)."""
from __future__ import annotations

import hmac
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from pdserve.common.config import CoordinatorConfig
from pdserve.coordinator import metrics
from pdserve.coordinator.http.calls import END, Choices
from pdserve.coordinator.http.errors import ApiError
from pdserve.coordinator.http.protocol import ChatRequest, CompletionRequest
from pdserve.coordinator.http.responses import Choice, Reply

OPEN_PATHS = ("/health", "/ready", "/metrics")  # no API key needed (probes and scrapers)


def build_app(coordinator, cfg: CoordinatorConfig) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(Guard, cfg=cfg, keys=coordinator.creds.api_keys)  # gRPC's keys: --api-key(-file)
    app.add_exception_handler(ApiError, lambda request, e: e.response())
    # an unknown path or method: an OpenAI error object too, not FastAPI's {"detail": ...}
    app.add_exception_handler(HTTPException, lambda request, e: ApiError(e.status_code, str(e.detail)).response())

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """200 only when a request could be served now (live prefill and decode nodes, or a
        colocated node, with their token streams open to this process)."""
        if coordinator.model.info is not None and coordinator.routable():
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "reason": "no live prefill and decode node, nor a colocated node"},
                            status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        info = coordinator.model.info
        cards = [] if info is None else [
            {"id": info.name, "object": "model", "created": int(time.time()), "owned_by": "pdserve",
             "root": info.name, "max_model_len": info.max_model_len, "vocab_size": info.vocab_size}]
        return JSONResponse({"object": "list", "data": cards})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest, cfg)
        return await _serve(coordinator, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _parse(request, ChatRequest, cfg)
        return await _serve(coordinator, request, body, chat=True)

    return app


class Guard:
    """ASGI middleware: the API key (one of the keys gRPC accepts) and the declared body
    size, before any route runs."""

    def __init__(self, app, cfg: CoordinatorConfig, keys: frozenset[str]):
        self.app, self.cfg = app, cfg
        self.expected = [f"Bearer {k}".encode() for k in sorted(keys)]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            error = None
            given = headers.get(b"authorization", b"")
            if self.expected and scope["path"] not in OPEN_PATHS \
                    and not any([hmac.compare_digest(given, k) for k in self.expected]):  # each compared
                error = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")
            size = headers.get(b"content-length", b"")
            if error is None and size.isdigit() and int(size) > self.cfg.max_request_bytes:
                error = _too_large(self.cfg)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_large(cfg: CoordinatorConfig) -> ApiError:
    return ApiError(413, f"request body over {cfg.max_request_bytes} bytes (--max-request-bytes)",
                    code="request_too_large")


async def _parse(request: Request, kind, cfg: CoordinatorConfig):
    """The body as `kind`; 413 past the size limit (read in pieces: a chunked body has no
    Content-Length), 400 for malformed JSON, a wrong type or an unknown field."""
    data, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > cfg.max_request_bytes:
            raise _too_large(cfg)
        data.append(piece)
    try:
        return kind.model_validate_json(b"".join(data))
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {err['msg']}", code="invalid_json") from None
        raise ApiError(400, f"{param or 'body'}: {err['msg']}", param, code="invalid_value") from None


async def _serve(coordinator, request: Request, body, chat: bool) -> Response:
    try:
        reqs = body.requests()
    except ValueError as e:  # a number the wire cannot hold (int64)
        raise ApiError(400, str(e), code="invalid_value") from None
    info = coordinator.model.info
    reply = Reply(chat, body.model or (info.name if info else ""), body.n, body.return_token_ids)
    peer = f"http:{request.client.host}:{request.client.port}" if request.client else "http"
    choices = Choices(coordinator, reqs, chat, request.receive, peer)
    if not body.stream:
        return await _whole(choices, reply, len(reqs))
    return await _stream(choices, reply, len(reqs), body.include_usage)


async def _whole(choices: Choices, reply: Reply, count: int) -> Response:
    got = [Choice(i) for i in range(count)]
    try:
        async for index, item in choices.items():
            if isinstance(item, BaseException):
                raise ApiError.of(item)
            if item is not END:
                got[index].add(item)
    finally:
        choices.cancel()
    if choices.disconnected:
        return Response(status_code=499)
    return JSONResponse(reply.whole(got))


async def _stream(choices: Choices, reply: Reply, count: int, include_usage: bool) -> Response:
    """Headers go once every choice has its first token, so a request refused outright
    (a bad prompt, an unknown model, no capacity) still gets its HTTP status."""
    got = [Choice(i) for i in range(count)]
    items = choices.items()
    early, waiting = [], set(range(count))
    try:
        while waiting:
            index, item = await anext(items)
            if isinstance(item, BaseException):
                raise ApiError.of(item)
            early.append((index, item))
            waiting.discard(index)
    except StopAsyncIteration:
        choices.cancel()
        return Response(status_code=499)
    except BaseException:
        choices.cancel()
        await items.aclose()
        raise

    async def body():
        try:
            for i in range(count):
                yield reply.first(i)
            pending = list(early)
            while True:
                for index, item in pending:
                    if isinstance(item, BaseException):
                        yield Reply.error_chunk(ApiError.of(item).body())
                        yield Reply.DONE
                        return
                    if item is END:
                        continue
                    got[index].add(item)
                    yield reply.delta(index, item, got[index].finish)
                try:
                    pending = [await anext(items)]
                except StopAsyncIteration:
                    break
            if choices.disconnected:
                return
            if include_usage:
                yield reply.usage_chunk(got)
            yield Reply.DONE
        finally:
            choices.cancel()
            await items.aclose()
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
