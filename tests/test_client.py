"""The Python client for internal services: the sync side over grpcio-testing's channel
(what goes on the wire: metadata, request; statuses → typed exceptions), the async
side against the real in-process server, plus one sync call against the real server
for deadlines."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import grpc
import grpc_testing
import pytest

from switchboard.core.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    DeadlineExceededError,
    InternalError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UpstreamError,
    system,
    user,
)
from switchboard.core.errors import GatewayError
from switchboard.v1 import inference_pb2 as pb
from tests.harness import TEST_KEY, make_config, running_stack

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]
CHAT = SERVICE.methods_by_name["CreateChatCompletion"]
STREAM = SERVICE.methods_by_name["StreamChatCompletion"]


class Background:
    """Runs a blocking client call in a thread while the test plays the server."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> Any:
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.result


@pytest.fixture
def channel() -> grpc_testing.Channel:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


def test_sync_chat_sends_auth_and_request(channel: grpc_testing.Channel) -> None:
    client = Client(api_key="sk-client-123456", channel=channel, metadata=[("x-team", "search")])
    call = Background(lambda: client.chat("gpt-4o", [system("be brief"), ("user", "hi")],
                                          temperature=0.2, request_id="req-abc"))
    metadata, request, rpc = channel.take_unary_unary(CHAT)
    md = dict(metadata)
    assert md["authorization"] == "Bearer sk-client-123456"
    assert md["x-team"] == "search" and md["x-request-id"] == "req-abc"
    assert request.params.model == "gpt-4o"
    assert [m.role for m in request.params.messages] == [pb.ROLE_SYSTEM, pb.ROLE_USER]
    assert request.params.messages[1].text == "hi"
    assert request.params.temperature == pytest.approx(0.2)
    reply = pb.CreateChatCompletionResponse(id="c1", model="gpt-4o")
    reply.choices.add(index=0, message=pb.AssistantMessage(content="hello"))
    rpc.terminate(reply, (), grpc.StatusCode.OK, "")
    assert call.join().choices[0].message.content == "hello"
    assert call.error is None


@pytest.mark.parametrize(("err", "cls"), [
    (GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", code="rate_limit_exceeded",
                  retry_after=2.5), RateLimitError),
    (GatewayError(grpc.StatusCode.UNAUTHENTICATED, "bad key"), AuthenticationError),
    (GatewayError(grpc.StatusCode.PERMISSION_DENIED, "not yours", param="model"),
     PermissionDeniedError),
    (GatewayError(grpc.StatusCode.NOT_FOUND, "no such model", code="model_not_found",
                  param="model"), NotFoundError),
    (GatewayError(grpc.StatusCode.UNAVAILABLE, "all channels failed"), UpstreamError),
])
def test_sync_statuses_become_typed_errors_with_reason(channel: grpc_testing.Channel,
                                                        err: GatewayError, cls: type) -> None:
    client = Client(api_key="sk-client-123456", channel=channel)
    call = Background(lambda: client.chat("gpt-4o", [user("hi")]))
    _, _, rpc = channel.take_unary_unary(CHAT)
    rpc.terminate(None, (*err.grpc_trailers(), ("x-request-id", "req-xyz")), err.status, err.message)
    call.join()
    exc = call.error
    assert isinstance(exc, cls), exc
    assert exc.status == err.status and exc.message == err.message
    assert exc.reason == err.code and exc.param == err.param
    assert exc.retry_after == err.retry_after and exc.request_id == "req-xyz"


def test_sync_internal_status_without_details_hides_the_message(channel: grpc_testing.Channel) -> None:
    client = Client(api_key="k" * 10, channel=channel)
    call = Background(lambda: client.chat("gpt-4o", [user("hi")]))
    _, _, rpc = channel.take_unary_unary(CHAT)
    rpc.terminate(None, (), grpc.StatusCode.INTERNAL, "Traceback ... secret internals")
    call.join()
    assert isinstance(call.error, InternalError)
    assert "secret" not in call.error.message


def test_sync_stream(channel: grpc_testing.Channel) -> None:
    client = Client(api_key="sk-client-123456", channel=channel)
    call = Background(lambda: [c.choices[0].delta.content
                               for c in client.stream_chat("gpt-4o", [user("count")])])
    metadata, request, rpc = channel.take_unary_stream(STREAM)
    assert request.params.model == "gpt-4o"
    assert dict(metadata)["authorization"] == "Bearer sk-client-123456"
    for word in ("one ", "two"):
        chunk = pb.StreamChatCompletionResponse(id="s1")
        chunk.choices.add(index=0).delta.content = word
        rpc.send_response(chunk)
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert call.join() == ["one ", "two"]


def test_sync_stream_error_after_chunks(channel: grpc_testing.Channel) -> None:
    client = Client(api_key="sk-client-123456", channel=channel)
    got: list[str] = []

    def consume() -> None:
        for c in client.stream_chat("gpt-4o", [user("count")]):
            got.append(c.choices[0].delta.content)

    call = Background(consume)
    _, _, rpc = channel.take_unary_stream(STREAM)
    chunk = pb.StreamChatCompletionResponse(id="s1")
    chunk.choices.add(index=0).delta.content = "one"
    rpc.send_response(chunk)
    for _ in range(500):  # let the consumer take the chunk before the status arrives
        if got:
            break
        threading.Event().wait(0.01)
    err = GatewayError(grpc.StatusCode.UNAVAILABLE, "upstream failed mid-stream", code="upstream_error")
    rpc.terminate(err.grpc_trailers(), err.status, err.message)
    call.join()
    assert got == ["one"]
    assert isinstance(call.error, UpstreamError) and call.error.reason == "upstream_error"


# ---------------------------------------------------------- real server ----

ECHO = ("channels:\n  - {name: e, provider: echo, models: [echo, echo-image]}\n"
        "  - {name: slow, provider: echo, models: [slow-echo], options: {delay_ms: 300}}\n")


async def test_async_client_against_the_real_server() -> None:
    async with running_stack(make_config(ECHO)) as stack:
        async with AsyncClient(stack.grpc_target, api_key=TEST_KEY, timeout=10) as sb:
            reply = await sb.chat("echo", [user("hello there")])
            assert reply.choices[0].message.content == "hello there"
            assert reply.usage.completion_tokens == 2
            words = [c.choices[0].delta.content async for c in sb.stream_chat("echo", [user("a b c")])
                     if c.choices]
            assert "".join(words) == "a b c"
            assert {m.id for m in await sb.list_models()} == {"echo", "echo-image", "slow-echo"}
            img = await sb.create_image("echo-image", "a cat", response_format="b64_json")
            assert img.data[0].b64_json
            with pytest.raises(NotFoundError) as nf:
                await sb.chat("nope", [user("x")])
            assert nf.value.reason == "model_not_found" and nf.value.param == "model"
            assert nf.value.request_id.startswith("req_")
            with pytest.raises(DeadlineExceededError):
                async for _ in sb.stream_chat("slow-echo", [user("a b c d e")], timeout=0.5):
                    pass
        async with AsyncClient(stack.grpc_target, api_key="sk-wrong-wrong-wrong") as bad:
            with pytest.raises(AuthenticationError) as exc:
                await bad.chat("echo", [user("x")])
            assert exc.value.reason == "invalid_api_key"


async def test_sync_client_default_deadline_against_the_real_server() -> None:
    async with running_stack(make_config(ECHO)) as stack:
        def run() -> tuple[str, BaseException | None]:
            with Client(stack.grpc_target, api_key=TEST_KEY, timeout=0.5) as sb:
                text = sb.chat("echo", [user("sync hello")]).choices[0].message.content
                try:
                    list(sb.stream_chat("slow-echo", [user("a b c d e")]))
                except DeadlineExceededError as exc:
                    return text, exc
                return text, None

        text, err = await asyncio.to_thread(run)
    assert text == "sync hello"
    assert isinstance(err, DeadlineExceededError) and err.reason == "timeout"
