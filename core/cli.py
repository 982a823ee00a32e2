"""The `switchboard` command.

  switchboard serve [--config FILE]      core + façade in one process (sidecar mode);
                                         with no config: the echo demo on loopback
  switchboard core --config FILE         the gRPC core alone
  switchboard facade --core ADDR         the REST façade alone, calling a remote core

SIGTERM/SIGINT stop accepting, let in-flight requests finish for `shutdown_grace_s`,
then end the rest and exit. A ready line `switchboard: ready http=HOST:PORT
grpc=HOST:PORT` is printed to stdout once listening (ports resolved when 0 was asked).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from core.config import DEMO_KEY, Config, ConfigError, demo_config, load_config
from core.gateway import Gateway
from core.server import build_grpc_server, mark_serving
from facade.app import create_app
from facade.transport import GrpcTransport, Transport

log = logging.getLogger("switchboard")


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _start_http(transport: Transport, addr: str, config: Config
                      ) -> tuple[web.AppRunner, str]:
    app = create_app(transport, max_body_bytes=config.max_body_bytes)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.shutdown_grace_s)
    await runner.setup()
    host, port = _split(addr)
    site = web.TCPSite(runner, host, port)
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    return runner, f"{host}:{sock.getsockname()[1]}"


async def run(mode: str, config: Config, *, http: str | None, grpc_addr: str | None,
              core_target: str | None = None) -> None:
    gateway = Gateway(config) if mode in ("serve", "core") else None
    grpc_server = health = None
    ready = []
    if gateway is not None:
        grpc_server, gport, health = build_grpc_server(gateway, grpc_addr or config.listen_grpc)
        await grpc_server.start()
        await mark_serving(health, True)
        ready.append(f"grpc={_split(grpc_addr or config.listen_grpc)[0]}:{gport}")
    runner = None
    transport: Transport | None = None
    if mode in ("serve", "facade"):
        transport = gateway if gateway is not None else GrpcTransport(core_target or "")
        runner, where = await _start_http(transport, http or config.listen_http, config)
        ready.insert(0, f"http={where}")
    print("switchboard: ready " + " ".join(ready), flush=True)
    if config.source == "<demo>":
        print(f"switchboard: DEMO mode (echo provider, no upstream). Try:\n"
              f"  curl http://{ready[0][5:]}/v1/chat/completions -H 'Authorization: Bearer "
              f"{DEMO_KEY}' -H 'content-type: application/json' "
              "-d '{\"model\":\"echo\",\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}'",
              flush=True)
    await _stop_signal()
    log.info("shutting down: draining in-flight requests for up to %gs", config.shutdown_grace_s)
    if health is not None:
        await mark_serving(health, False)
    drains = []
    if runner is not None:
        drains.append(runner.cleanup())
    if grpc_server is not None:
        drains.append(grpc_server.stop(config.shutdown_grace_s))
    await asyncio.gather(*drains)
    if gateway is not None:
        await gateway.close()
    if isinstance(transport, GrpcTransport):
        await transport.close()
    log.info("stopped")


def _event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("serve", "core and façade in one process"),
                           ("core", "the gRPC core alone"),
                           ("facade", "the REST façade alone")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", help="YAML config file (serve: omit for the echo demo)")
        p.add_argument("--http", help="HTTP listen address, overrides listen.http")
        p.add_argument("--grpc", help="gRPC listen address, overrides listen.grpc")
        if name == "facade":
            p.add_argument("--core", required=True, help="address of the core, e.g. 127.0.0.1:50051")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        if args.config:
            config = load_config(args.config)
        elif args.cmd == "serve":
            config = demo_config()
        elif args.cmd == "facade":
            config = Config()
        else:
            parser.error("core needs --config FILE")
    except ConfigError as exc:
        print(f"switchboard: config error: {exc}", file=sys.stderr)
        return 2
    with _event_loop_runner() as runner:
        try:
            runner.run(run(args.cmd, config, http=args.http, grpc_addr=args.grpc,
                           core_target=getattr(args, "core", None)))
        except OSError as exc:
            print(f"switchboard: cannot start: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
