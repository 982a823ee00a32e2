"""The one error table (docs/design.md, "Errors"): every failure the gateway reports is a
`GatewayError`, which maps 1:1 to a gRPC status, an HTTP status and an OpenAI error
object. Both surfaces use this module; nothing else decides a status.

On gRPC the machine-readable part travels as a google.rpc.Status in the
`grpc-status-details-bin` trailer: an ErrorInfo (reason = the OpenAI `code`,
metadata = type and param) and, for limits, a RetryInfo. Rate-limit headers travel
as plain trailing metadata with their HTTP names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "switchboard.dev"

# gRPC status -> (HTTP status, OpenAI error.type, default OpenAI error.code)
_TABLE: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error", "model_not_allowed"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_exceeded", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (502, "upstream_error", "upstream_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "timeout"),
    # 499 is never written: the client is gone. It exists so logs and usage say why.
    grpc.StatusCode.CANCELLED: (499, "cancelled", "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "invalid_request_error", "not_implemented"),
    grpc.StatusCode.INTERNAL: (500, "server_error", "server_error"),
    grpc.StatusCode.UNKNOWN: (500, "server_error", "server_error"),
}

# OpenAI types that differ from the status default for a given code.
_TYPE_BY_CODE = {"insufficient_quota": "insufficient_quota"}


class GatewayError(Exception):
    """A failure with a place in the error table.

    `code` is the OpenAI `error.code` (and the gRPC ErrorInfo reason); `param` names
    the offending request field; `retry_after` (seconds), `headers` (HTTP names,
    e.g. x-ratelimit-*) and `quota` accompany RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        status: grpc.StatusCode,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        quota: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        http, etype, default_code = _TABLE.get(status, _TABLE[grpc.StatusCode.INTERNAL])
        self.code = code if code is not None else default_code
        self.type = _TYPE_BY_CODE.get(self.code or "", etype)
        self.http_status = http
        self.param = param
        self.retry_after = retry_after
        self.headers = headers or {}
        # (subject, description) of the limit that refused the request: a gRPC
        # google.rpc.QuotaFailure violation, e.g. ("key:team-a", "600 requests per minute").
        self.quota = quota

    def __repr__(self) -> str:
        return f"GatewayError({self.status.name}, {self.message!r}, code={self.code!r})"

    # ---- OpenAI / HTTP side -------------------------------------------------

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def http_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after)))
        return headers

    # ---- gRPC side ----------------------------------------------------------

    def grpc_trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        info = error_details_pb2.ErrorInfo(reason=self.code or "", domain=ERROR_DOMAIN)
        info.metadata["type"] = self.type
        if self.param:
            info.metadata["param"] = self.param
        status = status_pb2.Status(code=self.status.value[0], message=self.message)
        status.details.add().Pack(info)
        if self.retry_after is not None:
            retry = error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=int(self.retry_after),
                    nanos=int((self.retry_after % 1) * 1e9),
                )
            )
            status.details.add().Pack(retry)
        if self.quota is not None:
            failure = error_details_pb2.QuotaFailure()
            failure.violations.add(subject=self.quota[0], description=self.quota[1])
            status.details.add().Pack(failure)
        # grpcio-status owns the trailer's key and encoding (the serialized Status).
        trailers: list[tuple[str, str | bytes]] = list(rpc_status.to_status(status).trailing_metadata)
        trailers.extend((k.lower(), v) for k, v in self.headers.items())
        return tuple(trailers)

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> GatewayError:
        """Rebuild the error a remote core raised (used by the façade in split mode)."""
        status: grpc.StatusCode = err.code()
        message: str = err.details() or status.name
        code = param = None
        retry_after = None
        try:
            # None when the call carries no details; grpcio-status checks they agree with
            # the call's own code and message.
            detail: status_pb2.Status | None = rpc_status.from_call(err)
        except ValueError:
            detail = None  # details that contradict the status are not ours: ignore them
        for any_ in detail.details if detail is not None else ():
            if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_.Unpack(info)
                code = info.reason or None
                param = info.metadata.get("param")
            elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                any_.Unpack(retry)
                retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        headers = {key: value for key, value in rpc_trailers(err)
                   if key.startswith("x-ratelimit-") and isinstance(value, str)}
        if status == grpc.StatusCode.INTERNAL and code is None:
            # A transport-level failure, not one of ours: do not leak its details.
            message = "internal error in the gateway core"
        return cls(status, message, code=code, param=param, retry_after=retry_after,
                   headers=headers)


def rpc_trailers(err: grpc.RpcError) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata of a failed call as (key, value) pairs; () if it has none.

    types-grpcio declares RpcError.trailing_metadata() as objects with .key/.value, but
    both the sync errors and grpc.aio's AioRpcError yield plain (key, value) pairs at
    run time, which is what every caller here unpacks; hence the cast."""
    try:
        pairs = cast(Iterable[tuple[str, str | bytes]] | None, err.trailing_metadata())
        return tuple(pairs or ())
    except Exception:  # an error raised before the call had trailers
        return ()


def invalid(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message, param=param, code=code)


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.NOT_FOUND,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )
