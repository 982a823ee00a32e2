"""Hedged requests (route `hedge_after_ms`, off by default): when the chosen channel has
no first token after the delay, the next candidate starts too; the first to answer wins
and the other is cancelled, its upstream connection closed."""

from __future__ import annotations

import asyncio

import pytest

from switchboard.v1 import inference_pb2 as pb
from tests.fakes.faulty_upstream import Fault
from tests.harness import AUTH, channel_yaml, make_config, running_stack
from tests.test_resilience import ROUTER, ask, upstreams, wait_for

SLOW_S = 2.0  # the slow channel's first byte; timeouts are long so only hedging helps
LONG = "{connect: 5, first_token: 30, idle: 30, total: 60}"


def hedge_config(urls: dict[str, str], hedge_ms: float | None) -> str:
    hedge = f", hedge_after_ms: {hedge_ms:g}" if hedge_ms is not None else ""
    return (f"{ROUTER}\nchannels:\n"
            + channel_yaml("first", "openai", urls["first"], ["m"], priority=1, timeouts=LONG) + "\n"
            + channel_yaml("second", "openai", urls["second"], ["m"], priority=0, timeouts=LONG)
            + f"\nroutes:\n  - {{model: fast, targets: [m]{hedge}}}\n")


@pytest.mark.parametrize("surface", ["rest", "grpc"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_hedge_wins_and_the_slow_attempt_is_cancelled(stream: bool, surface: str) -> None:
    async with upstreams() as ups:
        await ups.add("first", Fault("slow_first_byte", delay_s=SLOW_S))
        await ups.add("second", Fault())
        async with running_stack(make_config(hedge_config(ups.urls, 150))) as stack:
            reply = await ask(surface, stack, stream, model="fast")
            assert reply.ok, reply
            assert reply.text == ups.fakes["second"].answer()
            if stream and surface == "rest":
                assert reply.last == "done"
            assert reply.elapsed < SLOW_S  # answered by the hedge, not by waiting
            assert ups.order() == ["first", "second"]
            first = ups.fakes["first"].requests[0]
            assert await wait_for(lambda: first.client_closed_at is not None)
            second = ups.fakes["second"].requests[0]
            assert second.started - first.started >= 0.1  # started only after the delay (150 ms)
            assert stack.usage.records[-1].channel == "second"


async def test_no_hedge_when_the_first_channel_is_quick() -> None:
    async with upstreams() as ups:
        await ups.add("first", Fault())
        await ups.add("second", Fault())
        async with running_stack(make_config(hedge_config(ups.urls, 500))) as stack:
            for surface in ("rest", "grpc"):
                for stream in (False, True):
                    reply = await ask(surface, stack, stream, model="fast")
                    assert reply.text == ups.fakes["first"].answer()
            assert ups.order() == ["first"] * 4


async def test_hedging_is_off_by_default() -> None:
    async with upstreams() as ups:
        await ups.add("first", Fault("slow_first_byte", delay_s=0.6))
        await ups.add("second", Fault())
        async with running_stack(make_config(hedge_config(ups.urls, None))) as stack:
            reply = await ask("rest", stack, False, model="fast")
            assert reply.text == ups.fakes["first"].answer()
            assert ups.order() == ["first"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_failed_hedge_leaves_the_original_to_answer(stream: bool) -> None:
    async with upstreams() as ups:
        await ups.add("first", Fault("slow_first_byte", delay_s=0.6))
        await ups.add("second", Fault("status", 503))
        async with running_stack(make_config(hedge_config(ups.urls, 100))) as stack:
            reply = await ask("grpc", stack, stream, model="fast")
            assert reply.ok, reply
            assert reply.text == ups.fakes["first"].answer()
            assert ups.order() == ["first", "second"]
            assert ups.fakes["first"].requests[0].client_closed_at is None


async def test_fast_failure_fails_over_before_the_hedge_delay() -> None:
    async with upstreams() as ups:
        await ups.add("first", Fault("status", 500))
        await ups.add("second", Fault())
        async with running_stack(make_config(hedge_config(ups.urls, 1000))) as stack:
            reply = await ask("rest", stack, True, model="fast")
            assert reply.ok and reply.text == ups.fakes["second"].answer()
            assert reply.elapsed < 1.0  # did not wait for the hedge timer
            assert ups.order() == ["first", "second"]


async def test_cancelled_client_cancels_both_hedged_attempts() -> None:
    """A client leaving while two attempts race takes both upstream requests with it."""
    async with upstreams() as ups:
        await ups.add("first", Fault("hang"))
        await ups.add("second", Fault("hang"))
        async with running_stack(make_config(hedge_config(ups.urls, 50))) as stack:
            params = pb.ChatCompletionParams(model="fast",
                                             messages=[pb.Message(role=pb.ROLE_USER, text="hi")])
            call = stack.stub.StreamChatCompletion(pb.StreamChatCompletionRequest(params=params),
                                                   metadata=AUTH)
            assert await wait_for(lambda: len(ups.journal) == 2)
            await asyncio.sleep(0.05)
            call.cancel()
            assert await wait_for(lambda: all(s.client_closed_at is not None for s in ups.journal))
