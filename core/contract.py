"""What the core promises its surfaces: the one module (with core/errors.py for the error
type and table, and core/bounds.py for the input bounds both surfaces share) that the
façade may import from the core. import-linter holds that line (pyproject.toml,
[tool.importlinter]; docs/architecture.md), so importing the façade never loads the
gateway, the providers, the store or Redis.

- `CallContext`: who is calling and under what terms, whatever the surface;
- `new_request_id`: the request id both surfaces give a call that came without one;
- `Transport`: the Gateway's call methods, as the façade sees them. The Gateway itself
  satisfies it in one process; the façade's GrpcTransport does over gRPC;
- `AdminCaller`: how the façade's /admin/v1 routes reach the admin API in one process
  (the composition root builds it from core/admin.py);
- `bearer_token`: the key from an Authorization header or metadata value;
- `MAX_MESSAGE_BYTES`: the gRPC message size limit both ends of a channel set;
- `ConnectionLimits`: the per-listener settings the façade's slow-client guard reads
  (core/config.py's ServerSettings has them).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import Message

from switchboard.v1 import inference_pb2 as pb

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class CallContext:
    """Who is calling and under what terms, independent of the surface."""

    api_key: str
    request_id: str
    surface: str  # "rest" | "grpc"
    deadline: float | None = None  # event-loop time; None = no caller deadline
    peer: str = ""
    traceparent: str = ""  # W3C trace context from the caller (REST header / gRPC metadata)
    # Set by the gateway once the request is admitted: x-ratelimit-* for the response
    # (REST headers, gRPC initial metadata); None when the key has no rate limits.
    response_headers: dict[str, str] | None = None


def new_request_id() -> str:
    # 128 random bits as 32 hex digits, like uuid4().hex but 5× cheaper (hot path).
    return f"req_{os.urandom(16).hex()}"


def bearer_token(authorization: str | None) -> str:
    """The key from an `Authorization: Bearer <key>` value ('' when absent)."""
    if not authorization:
        return ""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


class Transport(Protocol):
    async def chat(self, req: pb.CreateChatCompletionRequest,
                   ctx: CallContext) -> pb.CreateChatCompletionResponse: ...

    def stream_chat(self, req: pb.StreamChatCompletionRequest,
                    ctx: CallContext) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]: ...

    async def list_models(self, req: pb.ListModelsRequest,
                          ctx: CallContext) -> pb.ListModelsResponse: ...

    async def get_model(self, req: pb.GetModelRequest, ctx: CallContext) -> pb.GetModelResponse: ...

    async def create_image(self, req: pb.CreateImageRequest,
                           ctx: CallContext) -> pb.CreateImageResponse: ...


# One AdminService call: the RPC's name (e.g. "CreateApiKey"), its request, the caller's
# bearer token; the reply message, or a GatewayError.
AdminCaller = Callable[[str, Message, str], Awaitable[Message]]


class ConnectionLimits(Protocol):
    """One listener's limits on slow or idle clients (read-only, so a frozen settings
    object satisfies it)."""

    @property
    def header_timeout_s(self) -> float: ...

    @property
    def body_timeout_s(self) -> float: ...

    @property
    def idle_timeout_s(self) -> float: ...

    @property
    def max_connections(self) -> int: ...
