"""Python load drivers for what wrk cannot do: gRPC calls, and streams (time to first
token, total time, many held streams). Each run prints one JSON line on stdout;
bench/run.py starts them pinned to the driver core.

    python -m bench.drivers grpc-unary --target 127.0.0.1:50051 --key K -c 16 -d 5
    python -m bench.drivers rest-streams --url http://…/v1/chat/completions -n 200 -c 1
    python -m bench.drivers grpc-streams --target 127.0.0.1:50051 --key K -n 1000 -c 1000

Time to first token is measured to the first body bytes carrying an event (REST) or
the first message (gRPC), from just before the request is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp
import grpc
import orjson
import uvloop

from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc

MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100.0 * (len(s) - 1)))]


def summary(lat_us: list[float], **extra: Any) -> dict[str, Any]:
    return {"p50_us": pct(lat_us, 50), "p99_us": pct(lat_us, 99), **extra}


def chat_request(model: str) -> pb.ChatCompletionParams:
    return pb.ChatCompletionParams(model=model, messages=[
        pb.Message(role=pb.ROLE_USER, text=m["content"]) for m in MESSAGES])


async def grpc_unary(args: argparse.Namespace) -> dict[str, Any]:
    # Several channels, each its own TCP connection (a local subchannel pool), so that
    # SO_REUSEPORT workers each get some: one HTTP/2 connection lands on one worker.
    channels = [grpc.aio.insecure_channel(args.target,
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, args.channels))]
    try:
        stubs = [pb_grpc.InferenceServiceStub(ch) for ch in channels]
        md = (("authorization", f"Bearer {args.key}"),)
        req = pb.CreateChatCompletionRequest(params=chat_request(args.model))
        lat: list[float] = []
        errors = 0
        end = time.perf_counter() + args.duration

        async def worker(stub: pb_grpc.InferenceServiceStub) -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter_ns()
                if t0 / 1e9 >= end:
                    return
                try:
                    await stub.CreateChatCompletion(req, metadata=md)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                lat.append((time.perf_counter_ns() - t0) / 1000.0)

        started = time.perf_counter()
        await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(args.concurrency)))
        wall = time.perf_counter() - started
    finally:
        for ch in channels:
            await ch.close()
    return summary(lat, requests=len(lat), errors=errors, duration_s=wall, rps=len(lat) / wall)


async def _rest_stream(session: aiohttp.ClientSession, url: str, body: bytes,
                       headers: dict[str, str]) -> tuple[float, float, bool]:
    t0 = time.perf_counter_ns()
    ttft = -1.0
    tail = b""
    async with session.post(url, data=body, headers=headers) as resp:
        async for data in resp.content.iter_any():
            if ttft < 0 and b"data:" in data:
                ttft = (time.perf_counter_ns() - t0) / 1000.0
            tail = (tail + data)[-64:]
    total = (time.perf_counter_ns() - t0) / 1000.0
    return ttft, total, resp.status == 200 and b"[DONE]" in tail


async def _grpc_stream(stub: pb_grpc.InferenceServiceStub, req: pb.StreamChatCompletionRequest,
                       md: tuple[tuple[str, str], ...]) -> tuple[float, float, bool]:
    t0 = time.perf_counter_ns()
    ttft = -1.0
    finished = False
    async for msg in stub.StreamChatCompletion(req, metadata=md):
        if ttft < 0:
            ttft = (time.perf_counter_ns() - t0) / 1000.0
        finished = finished or any(c.finish_reason for c in msg.choices)
    return ttft, (time.perf_counter_ns() - t0) / 1000.0, finished


async def _run_streams(one: Any, n: int, concurrency: int) -> dict[str, Any]:
    ttfts: list[float] = []
    totals: list[float] = []
    failed = 0
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    async def task() -> None:
        nonlocal failed
        async with sem:
            try:
                ttft, total, ok = await one()
            except Exception as exc:  # a failed stream is a result, not a crash
                failed += 1
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
        if not ok or ttft < 0:
            failed += 1
            return
        ttfts.append(ttft)
        totals.append(total)

    started = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(n)))
    wall = time.perf_counter() - started
    return {"streams": n, "completed": len(ttfts), "failed": failed, "errors": errors,
            "ttft_p50_us": pct(ttfts, 50), "ttft_p99_us": pct(ttfts, 99),
            "total_p50_us": pct(totals, 50), "total_p99_us": pct(totals, 99), "wall_s": wall}


async def rest_streams(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"content-type": "application/json"}
    if args.key:
        headers["authorization"] = f"Bearer {args.key}"
    for h in args.header or ():
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    body = orjson.dumps({"model": args.model, "messages": MESSAGES, "stream": True})
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(args.warmup):
            await _rest_stream(session, args.url, body, headers)
        return await _run_streams(lambda: _rest_stream(session, args.url, body, headers),
                                  args.n, args.concurrency)


async def grpc_streams(args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        md = (("authorization", f"Bearer {args.key}"),)
        req = pb.StreamChatCompletionRequest(params=chat_request(args.model))
        for _ in range(args.warmup):
            await _grpc_stream(stub, req, md)
        return await _run_streams(lambda: asyncio.wait_for(_grpc_stream(stub, req, md),
                                                           args.timeout),
                                  args.n, args.concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("grpc-unary")
    u.add_argument("--target", required=True)
    u.add_argument("-c", "--concurrency", type=int, default=16)
    u.add_argument("-d", "--duration", type=float, default=5.0)
    u.add_argument("--channels", type=int, default=1, help="gRPC connections to spread over")
    for name in ("rest-streams", "grpc-streams"):
        s = sub.add_parser(name)
        if name == "rest-streams":
            s.add_argument("--url", required=True)
            s.add_argument("--header", action="append", help="extra header 'name: value'")
        else:
            s.add_argument("--target", required=True)
        s.add_argument("-n", type=int, default=200)
        s.add_argument("-c", "--concurrency", type=int, default=1)
        s.add_argument("--warmup", type=int, default=5)
        s.add_argument("--timeout", type=float, default=120.0)
    for p in (u, *sub.choices.values()):
        if "--key" not in p._option_string_actions:
            p.add_argument("--key", default="")
            p.add_argument("--model", default="bench")
    args = parser.parse_args()
    run = {"grpc-unary": grpc_unary, "rest-streams": rest_streams,
           "grpc-streams": grpc_streams}[args.cmd]
    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
