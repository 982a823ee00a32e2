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

from core.config import DEMO_KEY, Config, ConfigError, demo_config, load_config
from core.runtime import Runtime

log = logging.getLogger("switchboard")


async def _stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run(mode: str, config: Config, *, http: str | None, grpc_addr: str | None,
              core_target: str | None = None) -> None:
    runtime = Runtime(mode, config, http=http, grpc_addr=grpc_addr, core_target=core_target)
    await runtime.start()
    print(runtime.ready_line(), flush=True)
    if config.source == "<demo>":
        print(f"switchboard: DEMO mode (echo provider, no upstream). Try:\n"
              f"  curl {runtime.http_url}/v1/chat/completions -H 'Authorization: Bearer "
              f"{DEMO_KEY}' -H 'content-type: application/json' "
              "-d '{\"model\":\"echo\",\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}'",
              flush=True)
    await _stop_signal()
    await runtime.stop()


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
            p.add_argument("--core", required=True,
                           help="address of the core, e.g. 127.0.0.1:50051")
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
