"""A small typed Python client for internal services calling Switchboard over gRPC.

    from switchboard.client import Client, user

    with Client("switchboard:50051", api_key=os.environ["SWITCHBOARD_KEY"]) as sb:
        reply = sb.chat("gpt-4o", [user("Say hi")])
        print(reply.choices[0].message.content)
        for chunk in sb.stream_chat("gpt-4o", [user("Count to 3")]):
            print(chunk.choices[0].delta.content, end="")

`AsyncClient` has the same methods as coroutines / async iterators (grpc.aio).

Both set the `authorization: Bearer <key>` metadata on every call and a default
deadline (`timeout`, seconds; per call `timeout=` overrides it, None = no deadline),
and turn a failed call into a `SwitchboardError` subclass chosen by gRPC status that
carries the machine-readable `reason` (the ErrorInfo reason = OpenAI `error.code`, e.g.
"rate_limit_exceeded", "model_not_found"), `param`, `retry_after` and the request id.
The messages are the generated ones (`switchboard.v1.inference_pb2`); `chat` accepts
either ready-made `ChatCompletionParams` or a model and messages plus keyword fields.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeAlias

import grpc

from switchboard.core.errors import GatewayError, rpc_trailers
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc

__all__ = [
    "AsyncClient", "AuthenticationError", "CancelledError", "Client", "DeadlineExceededError",
    "InternalError", "InvalidRequestError", "NotFoundError", "PermissionDeniedError",
    "RateLimitError", "SwitchboardError", "UpstreamError", "assistant", "chat_params",
    "error_from_rpc", "message", "system", "user",
]

DEFAULT_TIMEOUT = 120.0
_MAX_MESSAGE = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", _MAX_MESSAGE),
                    ("grpc.max_send_message_length", _MAX_MESSAGE)]


# ---------------------------------------------------------------- errors ----

class SwitchboardError(Exception):
    """A call that failed. `reason` is the stable, machine-readable part."""

    def __init__(self, status: grpc.StatusCode, message: str, *, reason: str | None = None,
                 param: str | None = None, retry_after: float | None = None,
                 request_id: str = "") -> None:
        super().__init__(f"{status.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.status = status
        self.message = message
        self.reason = reason
        self.param = param
        self.retry_after = retry_after
        self.request_id = request_id


class InvalidRequestError(SwitchboardError):
    pass


class AuthenticationError(SwitchboardError):
    pass


class PermissionDeniedError(SwitchboardError):
    pass


class NotFoundError(SwitchboardError):
    pass


class RateLimitError(SwitchboardError):
    pass


class UpstreamError(SwitchboardError):
    """Every upstream channel failed (the gateway answered UNAVAILABLE)."""


class DeadlineExceededError(SwitchboardError):
    pass


class CancelledError(SwitchboardError):
    pass


class InternalError(SwitchboardError):
    pass


_BY_STATUS: dict[grpc.StatusCode, type[SwitchboardError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAVAILABLE: UpstreamError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def error_from_rpc(err: grpc.RpcError) -> SwitchboardError:
    """The typed exception for a failed call (status details parsed by core/errors.py)."""
    g = GatewayError.from_rpc_error(err)
    rid = ""
    for key, value in rpc_trailers(err):
        if key == "x-request-id" and isinstance(value, str):
            rid = value
    cls = _BY_STATUS.get(g.status, InternalError)
    return cls(g.status, g.message, reason=g.code, param=g.param, retry_after=g.retry_after,
               request_id=rid)




# -------------------------------------------------------------- messages ----

_ROLES = {"system": pb.ROLE_SYSTEM, "developer": pb.ROLE_DEVELOPER, "user": pb.ROLE_USER,
          "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}


def message(role: str, text: str) -> pb.Message:
    return pb.Message(role=_ROLES[role], text=text)


def system(text: str) -> pb.Message:
    return message("system", text)


def user(text: str) -> pb.Message:
    return message("user", text)


def assistant(text: str) -> pb.Message:
    return message("assistant", text)


MessageLike: TypeAlias = "pb.Message | tuple[str, str]"


def chat_params(model: str | pb.ChatCompletionParams, messages: Sequence[MessageLike] = (),
                **fields: Any) -> pb.ChatCompletionParams:
    """Build the request params: `model` may already be a ChatCompletionParams; messages
    may be pb.Message or (role, text) pairs; other fields are set by name."""
    if isinstance(model, pb.ChatCompletionParams):
        return model
    params = pb.ChatCompletionParams(model=model, **fields)
    for m in messages:
        params.messages.append(m if isinstance(m, pb.Message) else message(*m))
    return params


# --------------------------------------------------------------- clients ----

class _Base:
    def __init__(self, api_key: str, timeout: float | None, metadata: Sequence[tuple[str, str]]
                 ) -> None:
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"), *metadata)

    def _kw(self, timeout: object, request_id: str | None) -> dict[str, Any]:
        md = self._metadata
        if request_id:
            md = (*md, ("x-request-id", request_id))
        return {"metadata": md, "timeout": self.timeout if timeout is _DEFAULT else timeout}


_DEFAULT: Any = object()


class Client(_Base):
    """Synchronous client. Pass `channel` to use your own (e.g. with TLS credentials)."""

    def __init__(self, target: str = "", *, api_key: str, timeout: float | None = DEFAULT_TIMEOUT,
                 channel: grpc.Channel | None = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(api_key, timeout, metadata)
        self._own = channel is None
        self.channel = channel or grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)

    def close(self) -> None:
        if self._own:
            self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chat(self, model: str | pb.ChatCompletionParams, messages: Sequence[MessageLike] = (), *,
             timeout: float | None = _DEFAULT, request_id: str | None = None,
             **fields: Any) -> pb.CreateChatCompletionResponse:
        req = pb.CreateChatCompletionRequest(params=chat_params(model, messages, **fields))
        try:
            resp: pb.CreateChatCompletionResponse = self.stub.CreateChatCompletion(
                req, **self._kw(timeout, request_id))
            return resp
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def stream_chat(self, model: str | pb.ChatCompletionParams, messages: Sequence[MessageLike] = (),
                    *, timeout: float | None = _DEFAULT, request_id: str | None = None,
                    **fields: Any) -> Iterator[pb.StreamChatCompletionResponse]:
        """Chunks as they arrive; the last carries finish reasons and usage. Leaving the
        loop early cancels the call (and the upstream request)."""
        req = pb.StreamChatCompletionRequest(params=chat_params(model, messages, **fields))
        call = self.stub.StreamChatCompletion(req, **self._kw(timeout, request_id))
        try:
            yield from call
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()

    def list_models(self, *, timeout: float | None = _DEFAULT) -> list[pb.Model]:
        try:
            resp = self.stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout, None))
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return list(resp.models)

    def create_image(self, model: str, prompt: str, *, timeout: float | None = _DEFAULT,
                     **fields: Any) -> pb.CreateImageResponse:
        req = pb.CreateImageRequest(model=model, prompt=prompt, **fields)
        try:
            resp: pb.CreateImageResponse = self.stub.CreateImage(req, **self._kw(timeout, None))
            return resp
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None


class AsyncClient(_Base):
    """The same over grpc.aio; create and use it inside the event loop."""

    def __init__(self, target: str = "", *, api_key: str, timeout: float | None = DEFAULT_TIMEOUT,
                 channel: grpc.aio.Channel | None = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(api_key, timeout, metadata)
        self._own = channel is None
        self.channel = channel or grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)

    async def close(self) -> None:
        if self._own:
            await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def chat(self, model: str | pb.ChatCompletionParams, messages: Sequence[MessageLike] = (),
                   *, timeout: float | None = _DEFAULT, request_id: str | None = None,  # noqa: ASYNC109 (the gRPC deadline)
                   **fields: Any) -> pb.CreateChatCompletionResponse:
        req = pb.CreateChatCompletionRequest(params=chat_params(model, messages, **fields))
        try:
            resp: pb.CreateChatCompletionResponse = await self.stub.CreateChatCompletion(
                req, **self._kw(timeout, request_id))
            return resp
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    async def stream_chat(self, model: str | pb.ChatCompletionParams,
                          messages: Sequence[MessageLike] = (), *,
                          timeout: float | None = _DEFAULT, request_id: str | None = None,  # noqa: ASYNC109 (the gRPC deadline)
                          **fields: Any) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        req = pb.StreamChatCompletionRequest(params=chat_params(model, messages, **fields))
        call = self.stub.StreamChatCompletion(req, **self._kw(timeout, request_id))
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = _DEFAULT) -> list[pb.Model]:  # noqa: ASYNC109 (the gRPC deadline)
        try:
            resp = await self.stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout, None))
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return list(resp.models)

    async def create_image(self, model: str, prompt: str, *, timeout: float | None = _DEFAULT,  # noqa: ASYNC109 (the gRPC deadline)
                           **fields: Any) -> pb.CreateImageResponse:
        req = pb.CreateImageRequest(model=model, prompt=prompt, **fields)
        try:
            resp: pb.CreateImageResponse = await self.stub.CreateImage(req, **self._kw(timeout, None))
            return resp
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
