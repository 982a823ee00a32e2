"""Framework floors: what the libraries Switchboard stands on cost per request by
themselves, measured the same way as bench/run.py (pinned, CPU from /proc, c=64).

    python -m bench.floor

- `grpc.aio fixed reply`: a grpc.aio servicer returning a prebuilt chat reply, no work;
- `aiohttp fixed reply`: an aiohttp handler returning fixed JSON;
- `aiohttp → aiohttp client proxy`: an aiohttp handler that POSTs to the mock upstream with
  aiohttp's client and returns its bytes (no parsing, auth, routing or logging).

Switchboard's figure minus the floor is what its own pipeline costs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from bench.run import (
    GW_CORE,
    PY,
    Bench,
    Server,
    cpu_seconds,
    free_port,
    spawn,
    start_mock,
    wait_port,
)

MODES = ("grpc", "fixed", "proxy")
LABELS = {"grpc": "grpc.aio fixed reply", "fixed": "aiohttp fixed reply",
          "proxy": "aiohttp → aiohttp client proxy"}


async def serve(mode: str, port: int, upstream: str) -> None:
    import aiohttp
    import grpc
    import orjson
    from aiohttp import web

    from switchboard.v1 import inference_pb2 as pb
    from switchboard.v1 import inference_pb2_grpc as pb_grpc

    if mode == "grpc":
        reply = pb.CreateChatCompletionResponse(id="x", model="bench", choices=[pb.Choice(
            index=0, message=pb.AssistantMessage(content="Hello! How can I help you today?"))])

        class Fixed(pb_grpc.InferenceServiceServicer):
            async def CreateChatCompletion(self, request: Any, context: Any) -> Any:
                return reply

        server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(Fixed(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
    else:
        session = aiohttp.ClientSession()
        body = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]})

        async def fixed(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=b'{"ok":true}', content_type="application/json")

        async def proxy(request: web.Request) -> web.Response:
            await request.read()
            async with session.post(upstream, data=body,
                                    headers={"content-type": "application/json"}) as r:
                data = await r.read()
            return web.Response(body=data, content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", fixed if mode == "fixed" else proxy)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=6.0)
    args = parser.parse_args()
    if args.serve:
        import uvloop
        uvloop.run(serve(args.serve, args.port, args.upstream))
        return 0
    mock = start_mock()
    bench = Bench(argparse.Namespace(duration=args.duration), mock)
    print("| floor | CPU s per 1k requests (c=64) | req/s |\n|---|---|---|")
    try:
        for mode in MODES:
            port = free_port()
            proc = spawn([PY, "-m", "bench.floor", "--serve", mode, "--port", str(port),
                          "--upstream", mock.url], GW_CORE, f"floor-{mode}")
            srv = Server(LABELS[mode], proc, f"http://127.0.0.1:{port}/v1/chat/completions",
                         grpc=f"127.0.0.1:{port}")
            try:
                wait_port(port, 20, proc)
                if mode == "grpc":
                    bench.grpc_unary(srv, 16, 1.0)
                    m = bench.grpc_unary(srv, 64, args.duration)
                else:
                    bench.wrk(srv, srv.url, 16, "", [], 1.0)
                    m = bench.wrk(srv, srv.url, 64, "", [], args.duration)
                assert cpu_seconds(srv.pids()) > 0
                print(f"| {LABELS[mode]} | {m.cpu_per_1k or float('nan'):.3f} | {m.rps:,.0f} |",
                      flush=True)
            finally:
                srv.stop()
    finally:
        mock.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
