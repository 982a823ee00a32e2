"""`switchboard serve --workers N`: N processes share the HTTP and gRPC ports through
SO_REUSEPORT, the parent prints one ready line, and SIGTERM stops them all cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import httpx

from switchboard.core.config import DEMO_KEY
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


async def test_two_workers_share_ports_and_stop_on_sigterm() -> None:
    http, grpc_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "switchboard.core.composition.cli", "serve", "--workers", "2",
        "--http", f"127.0.0.1:{http}", "--grpc", f"127.0.0.1:{grpc_port}",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith(f"switchboard: ready http=127.0.0.1:{http} "
                               f"grpc=127.0.0.1:{grpc_port}")
        assert line.rstrip().endswith("workers=2")
        assert len(children(proc.pid)) == 2

        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient() as client:
            for _ in range(6):  # new connections: the kernel spreads them over the workers
                r = await client.post(f"http://127.0.0.1:{http}/v1/chat/completions", json=body,
                                      headers={"authorization": f"Bearer {DEMO_KEY}",
                                               "connection": "close"})
                assert r.status_code == 200, r.text
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            resp = await stub.CreateChatCompletion(
                pb.CreateChatCompletionRequest(params=pb.ChatCompletionParams(
                    model="echo", messages=[pb.Message(role=pb.ROLE_USER, text="hi")])),
                metadata=(("authorization", f"Bearer {DEMO_KEY}"),))
            assert resp.choices[0].message.content

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_workers_need_fixed_ports() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "switchboard.core.composition.cli", "serve", "--workers", "2", "--http", "127.0.0.1:0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"fixed ports" in err
