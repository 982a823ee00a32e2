"""The real `switchboard` processes as a user runs them: `switchboard serve` with no
config (the README's first command), and `switchboard core` + `switchboard facade`
apart; SIGTERM drains and exits cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import openai

from switchboard.core.config import DEMO_KEY
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc

SWITCHBOARD = [sys.executable, "-m", "switchboard.core.cli"]


@asynccontextmanager
async def process(*args: str, cwd: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, str]]]:
    proc = await asyncio.create_subprocess_exec(
        *SWITCHBOARD, *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert line.startswith("switchboard: ready"), line
    addrs = dict(part.split("=", 1) for part in line.split()[2:])
    try:
        yield proc, addrs
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)


async def test_serve_with_no_config_answers_the_openai_sdk(tmp_path: Path) -> None:
    async with process("serve", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", cwd=tmp_path) as (proc, addrs):
        client = openai.AsyncOpenAI(base_url=f"http://{addrs['http']}/v1", api_key=DEMO_KEY)
        r = await client.chat.completions.create(model="echo",
                                                 messages=[{"role": "user", "content": "hi there"}])
        assert r.choices[0].message.content == "hi there"
        words = [c.choices[0].delta.content async for c in await client.chat.completions.create(
            model="echo", stream=True, messages=[{"role": "user", "content": "streamed word by word"}])
            if c.choices and c.choices[0].delta.content]
        assert words == ["streamed ", "word ", "by ", "word"]
        await client.close()
        async with grpc.aio.insecure_channel(addrs["grpc"]) as ch:
            rpc = await pb_grpc.InferenceServiceStub(ch).CreateChatCompletion(
                pb.CreateChatCompletionRequest(params=pb.ChatCompletionParams(
                    model="echo", messages=[pb.Message(role=pb.ROLE_USER, text="hi there")])),
                metadata=(("authorization", f"Bearer {DEMO_KEY}"),))
        assert rpc.choices[0].message.content == "hi there"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_core_and_facade_apart(tmp_path: Path) -> None:
    cfg = tmp_path / "sb.yaml"
    cfg.write_text("channels:\n  - {name: echo, provider: echo, models: [echo]}\n"
                   "keys:\n  - {name: app, key: ${APP_KEY}}\nshutdown_grace_s: 2\n")
    os.environ["APP_KEY"] = "sk-apart-key-42"
    try:
        async with process("core", "--config", str(cfg), "--grpc", "127.0.0.1:0", cwd=tmp_path) as (_, core), \
                process("facade", "--core", core["grpc"], "--http", "127.0.0.1:0", cwd=tmp_path) as (_, fac):
            client = openai.AsyncOpenAI(base_url=f"http://{fac['http']}/v1", api_key="sk-apart-key-42",
                                        max_retries=0)
            r = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x y"}])
            assert r.choices[0].message.content == "x y"
            try:
                await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}],
                                                     extra_headers={"authorization": "Bearer sk-wrong-000"})
                raise AssertionError("a wrong key was accepted")
            except openai.AuthenticationError as exc:
                assert exc.status_code == 401
            await client.close()
    finally:
        del os.environ["APP_KEY"]


async def test_bad_config_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("channels:\n  - {name: a, provider: nope, models: [m]}\n")
    proc = await asyncio.create_subprocess_exec(*SWITCHBOARD, "serve", "--config", str(cfg),
                                                stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert f"{cfg}: channels[0].provider: unknown provider 'nope'" in err.decode()


async def test_a_taken_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Issue 10 item 6: HTTP or gRPC, a port already in use is one line naming the
    address and exit status 2; no traceback, and the process does not hang."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    addr = f"127.0.0.1:{taken.getsockname()[1]}"
    try:
        for surface, args in (("HTTP", ("--http", addr, "--grpc", "127.0.0.1:0")),
                              ("gRPC", ("--http", "127.0.0.1:0", "--grpc", addr))):
            proc = await asyncio.create_subprocess_exec(
                *SWITCHBOARD, "serve", *args, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 2, (surface, out, err)
            lines = [ln for ln in err.decode().splitlines() if ln.startswith("switchboard:")]
            assert lines == [f"switchboard: cannot listen for {surface} on {addr}: "
                             "Address already in use"], err.decode()
            assert "Traceback" not in err.decode() and b"ready" not in out
    finally:
        taken.close()
