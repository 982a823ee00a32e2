"""Graceful drain, against a real `switchboard serve` process and SIGTERM.

After the signal the process stops accepting new connections on both surfaces; work
already in flight gets `shutdown_grace_s` to finish; what is still running then ends
with a clear error — a final SSE error event on open REST streams, UNAVAILABLE on gRPC
calls, both with the code `server_shutting_down` — and the process exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from switchboard.core.errors import GatewayError
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes.faulty_upstream import Fault
from tests.harness import AUTH, TEST_KEY, channel_yaml
from tests.test_resilience import upstreams, wait_for

GRACE_S = 2.0
SWITCHBOARD = str(Path(sys.executable).with_name("switchboard"))


async def _serve(tmp_path: Path, config: str) -> tuple[asyncio.subprocess.Process, str, str]:
    cfg = tmp_path / "switchboard.yaml"
    cfg.write_text(config)
    log = (tmp_path / "stderr.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        SWITCHBOARD, "serve", "--config", str(cfg), "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=log, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    match = re.search(r"http=(\S+) grpc=(\S+)", line)
    assert match, f"no ready line: {line!r}; stderr: {(tmp_path / 'stderr.log').read_text()}"
    return proc, match.group(1), match.group(2)


async def _rest_stream(http: aiohttp.ClientSession, addr: str, model: str,
                       started: asyncio.Event, text: str = "hi") -> list[dict[str, object] | str]:
    """All SSE data payloads of one streamed request ("[DONE]" kept as a string)."""
    events: list[dict[str, object] | str] = []
    async with http.post(f"http://{addr}/v1/chat/completions",
                         headers={"authorization": f"Bearer {TEST_KEY}"},
                         json={"model": model, "stream": True,
                               "messages": [{"role": "user", "content": text}]}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: "):
                payload = line[6:].strip()
                events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
                started.set()
    return events


async def _grpc_stream(stub: pb_grpc.InferenceServiceStub, model: str,
                       started: asyncio.Event) -> tuple[str, str | None, int]:
    params = pb.ChatCompletionParams(model=model, messages=[pb.Message(role=pb.ROLE_USER, text="hi")])
    n = 0
    try:
        async for _ in stub.StreamChatCompletion(pb.StreamChatCompletionRequest(params=params),
                                                 metadata=AUTH):
            n += 1
            started.set()
    except grpc.aio.AioRpcError as err:
        return err.code().name, GatewayError.from_rpc_error(err).code, n
    return "OK", None, n


async def _rest_unary(http: aiohttp.ClientSession, addr: str, model: str) -> tuple[int, dict[str, object]]:
    async with http.post(f"http://{addr}/v1/chat/completions",
                         headers={"authorization": f"Bearer {TEST_KEY}"},
                         json={"model": model, "messages": [{"role": "user", "content": "hi"}]}) as r:
        return r.status, await r.json()


async def _refused(addr: str) -> bool:
    host, port = addr.split(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    writer.close()
    return False


async def test_sigterm_drains_then_ends_the_rest_with_a_clear_error(tmp_path: Path) -> None:
    async with upstreams() as ups:
        await ups.add("slow", Fault(interval_s=1.0))         # ~8 s per answer: outlives the grace
        await ups.add("quick", Fault(interval_s=0.1))        # < 1 s: finishes within the grace
        await ups.add("lag", Fault("slow_first_byte", delay_s=1.0))
        await ups.add("stuck", Fault("hang"))              # unary calls that never answer
        config = ("channels:\n"
                  + channel_yaml("slow", "openai", ups.urls["slow"], ["slow-model"]) + "\n"
                  + channel_yaml("quick", "openai", ups.urls["quick"], ["quick-model"]) + "\n"
                  + channel_yaml("lag", "openai", ups.urls["lag"], ["lag-model"]) + "\n"
                  + channel_yaml("stuck", "openai", ups.urls["stuck"], ["stuck-model"]) + "\n"
                  + f"keys: [{{name: test, key: {TEST_KEY}}}]\n"
                  + f"shutdown_grace_s: {GRACE_S}\n")
        proc, http_addr, grpc_addr = await _serve(tmp_path, config)
        loop = asyncio.get_running_loop()
        try:
            async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(grpc_addr) as ch:
                stub = pb_grpc.InferenceServiceStub(ch)
                flags = [asyncio.Event() for _ in range(3)]
                rest_slow = asyncio.ensure_future(_rest_stream(http, http_addr, "slow-model", flags[0]))
                grpc_slow = asyncio.ensure_future(_grpc_stream(stub, "slow-model", flags[1]))
                rest_quick = asyncio.ensure_future(_rest_stream(http, http_addr, "quick-model", flags[2]))
                for f in flags:
                    await asyncio.wait_for(f.wait(), 10)
                rest_lag = asyncio.ensure_future(_rest_unary(http, http_addr, "lag-model"))
                rest_stuck = asyncio.ensure_future(_rest_unary(http, http_addr, "stuck-model"))
                grpc_stuck = asyncio.ensure_future(stub.CreateChatCompletion(
                    pb.CreateChatCompletionRequest(params=pb.ChatCompletionParams(
                        model="stuck-model", messages=[pb.Message(role=pb.ROLE_USER, text="hi")])),
                    metadata=AUTH))
                assert await wait_for(lambda: len(ups.fakes["lag"].requests) == 1)
                assert await wait_for(lambda: len(ups.fakes["stuck"].requests) == 2)

                proc.send_signal(signal.SIGTERM)
                signalled = loop.time()

                # Stops accepting: new connections are refused on both surfaces.
                refused = False
                while loop.time() - signalled < 1.5 and not refused:
                    refused = await _refused(http_addr)
                    await asyncio.sleep(0.02)
                assert refused, "the REST listener still accepts connections while draining"
                async with grpc.aio.insecure_channel(grpc_addr) as fresh:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await pb_grpc.InferenceServiceStub(fresh).ListModels(
                            pb.ListModelsRequest(), metadata=AUTH, timeout=1.0)
                    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                                 grpc.StatusCode.DEADLINE_EXCEEDED)

                # In-flight work that fits the grace period finishes normally.
                quick = await asyncio.wait_for(rest_quick, 10)
                assert quick[-1] == "[DONE]"
                status, body = await asyncio.wait_for(rest_lag, 10)
                choices: Any = body["choices"]
                assert status == 200 and choices[0]["message"]["content"] == ups.fakes["lag"].answer()

                # The rest ends with a clear error once the grace period is over.
                slow_events = await asyncio.wait_for(rest_slow, 10)
                ended = loop.time() - signalled
                last = slow_events[-1]
                assert isinstance(last, dict) and "error" in last, slow_events
                assert last["error"]["code"] == "server_shutting_down"  # type: ignore[index]
                assert "[DONE]" not in slow_events
                assert GRACE_S - 0.2 < ended < GRACE_S + 3.0
                code, reason, n = await asyncio.wait_for(grpc_slow, 10)
                assert (code, reason) == ("UNAVAILABLE", "server_shutting_down") and n >= 1
                status, body = await asyncio.wait_for(rest_stuck, 10)
                error: Any = body["error"]
                assert status == 502 and error["code"] == "server_shutting_down"
                with pytest.raises(grpc.aio.AioRpcError) as stuck_info:
                    await asyncio.wait_for(grpc_stuck, 10)
                assert stuck_info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert GatewayError.from_rpc_error(stuck_info.value).code == "server_shutting_down"

            rc = await asyncio.wait_for(proc.wait(), GRACE_S + 10)
            assert rc == 0
            assert loop.time() - signalled < GRACE_S + 5.0
            for name in ("slow", "stuck"):  # their upstream requests were closed, not leaked
                assert all(s.client_closed_at is not None for s in ups.fakes[name].requests)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_sigterm_with_nothing_in_flight_exits_at_once(tmp_path: Path) -> None:
    async with upstreams() as ups:
        await ups.add("quick", Fault())
        config = ("channels:\n" + channel_yaml("quick", "openai", ups.urls["quick"], ["m"]) + "\n"
                  + f"keys: [{{name: test, key: {TEST_KEY}}}]\nshutdown_grace_s: 30\n")
        proc, http_addr, _ = await _serve(tmp_path, config)
        try:
            async with aiohttp.ClientSession() as http:
                status, _ = await _rest_unary(http, http_addr, "m")
                assert status == 200
            loop = asyncio.get_running_loop()
            t = loop.time()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            assert loop.time() - t < 10  # not the 30 s grace: nothing was left to wait for
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_facade_only_process_ends_open_streams_with_an_error_event(tmp_path: Path) -> None:
    """`switchboard facade` apart from its core: on SIGTERM its own open streams get the
    `server_shutting_down` event after the grace period, not a bare close."""
    cfg = tmp_path / "switchboard.yaml"
    cfg.write_text("channels:\n  - {name: echo, provider: echo, models: [echo], options: {delay_ms: 400}}\n"
                   f"keys: [{{name: test, key: {TEST_KEY}}}]\nshutdown_grace_s: 1\n")
    core = await asyncio.create_subprocess_exec(
        SWITCHBOARD, "core", "--config", str(cfg), "--grpc", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=tmp_path)
    assert core.stdout is not None
    grpc_addr = re.search(r"grpc=(\S+)", (await asyncio.wait_for(core.stdout.readline(), 20)).decode())
    assert grpc_addr
    facade = await asyncio.create_subprocess_exec(
        SWITCHBOARD, "facade", "--config", str(cfg), "--core", grpc_addr.group(1), "--http", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=tmp_path)
    assert facade.stdout is not None
    http_addr = re.search(r"http=(\S+)", (await asyncio.wait_for(facade.stdout.readline(), 20)).decode())
    assert http_addr
    try:
        async with aiohttp.ClientSession() as http:
            started = asyncio.Event()
            body = " ".join(["word"] * 40)  # 40 words x 0.4 s: far longer than the grace
            stream = asyncio.ensure_future(_rest_stream(http, http_addr.group(1), "echo", started, body))
            await asyncio.wait_for(started.wait(), 10)
            facade.send_signal(signal.SIGTERM)
            events = await asyncio.wait_for(stream, 10)
        last = events[-1]
        assert isinstance(last, dict) and last["error"]["code"] == "server_shutting_down", events  # type: ignore[index]
        assert "[DONE]" not in events
        assert await asyncio.wait_for(facade.wait(), 10) == 0
    finally:
        for p in (facade, core):
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
                await asyncio.wait_for(p.wait(), 10)

