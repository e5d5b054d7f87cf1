"""OpenAI error objects, and the HTTP status of each gRPC status a request can end with."""
from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

from pdserve.coordinator.admission import RETRY_AFTER_KEY
from pdserve.wire.rpc import status_for

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

PARAMS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
          "frequency_penalty", "stop", "stop_token_ids", "seed", "prompt"}

# the `type` OpenAI gives each status class
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """A request the HTTP layer refuses: its HTTP status, message, and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_ms: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_ms = retry_after_ms  # admission's hint (gRPC trailer retry-after-ms) -> Retry-After

    @classmethod
    def of(cls, exc: BaseException) -> "ApiError":
        """The error a coordinator request ended with (RpcError, ValueError, MemoryError, ...)."""
        if isinstance(exc, ApiError):
            return exc
        code, message = status_for(exc)
        status = HTTP_STATUS.get(code, 500)
        first = message.split(" ", 1)[0]  # the engine's checks name the field first ("top_p must be ...")
        param = first if code == grpc.StatusCode.INVALID_ARGUMENT and first in PARAMS else None
        if code == grpc.StatusCode.NOT_FOUND:
            param = "model"
        retry = dict(getattr(exc, "trailers", ())).get(RETRY_AFTER_KEY)
        return cls(status, message, param,
                   code="model_not_found" if code == grpc.StatusCode.NOT_FOUND else code.name.lower(),
                   retry_after_ms=int(retry) if retry else None)

    def body(self) -> dict:
        kind = ERROR_TYPE.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after_ms is not None:
            headers["Retry-After"] = str(max(1, -(-self.retry_after_ms // 1000)))  # whole seconds, rounded up
        return JSONResponse(self.body(), status_code=self.status, headers=headers)
