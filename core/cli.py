"""The `switchboard` command.

  switchboard serve [--config FILE]      core + façade in one process (sidecar mode);
                                         with no config: the echo demo on loopback
  switchboard core --config FILE         the gRPC core alone
  switchboard facade --core ADDR         the REST façade alone, calling a remote core
  switchboard check-config FILE          validate a config: prints OK (exit 0) or the
                                         error (exit 2); nothing is started

SIGHUP re-reads the config file and applies its channels, keys and routes without
dropping in-flight requests; a config that does not load is logged and the running one
keeps serving. Logs go to stderr in the configured format (`observability.log_format`:
json by default), with secrets redacted (core/logs.py).

`--workers N` (N > 1, fixed ports) starts N worker processes that each bind the same
HTTP and gRPC ports with SO_REUSEPORT (the kernel spreads connections among them); the
parent only supervises: it prints one ready line once every worker is up, forwards
SIGTERM/SIGINT to them and exits when they have drained. Workers share nothing in memory,
so in-memory limits are per worker: use Redis limits for exact figures with N > 1.

SIGTERM/SIGINT stop accepting, let in-flight requests finish for `shutdown_grace_s`,
then end the rest and exit. A ready line `switchboard: ready http=HOST:PORT
grpc=HOST:PORT` is printed to stdout once listening (ports resolved when 0 was asked).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Sequence

from switchboard.core.cli_admin import register as register_admin_commands
from switchboard.core.cli_admin import run_admin
from switchboard.core.config import DEMO_KEY, Config, ConfigError, demo_config, load_config
from switchboard.core.logs import setup_logging
from switchboard.core.runtime import Runtime
from switchboard.core.server import ListenError

log = logging.getLogger("switchboard")


def _stop_signal() -> asyncio.Event:
    """An event set by SIGTERM/SIGINT. Installed before the ready line is printed: a
    signal sent as soon as "ready" is read must not meet the default action (which kills
    the process without draining, and orphans a supervisor's workers)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run(mode: str, config: Config, *, http: str | None, grpc_addr: str | None,
              core_target: str | None = None, reuse_port: bool = False) -> None:
    runtime = Runtime(mode, config, http=http, grpc_addr=grpc_addr, core_target=core_target,
                      reuse_port=reuse_port)
    await runtime.start()
    _reload_on_sighup(runtime)
    stop = _stop_signal()
    print(runtime.ready_line(), flush=True)
    if config.source == "<demo>":
        print(f"switchboard: DEMO mode (echo provider, no upstream). Try:\n"
              f"  curl {runtime.http_url}/v1/chat/completions -H 'Authorization: Bearer "
              f"{DEMO_KEY}' -H 'content-type: application/json' "
              "-d '{\"model\":\"echo\",\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}'",
              flush=True)
    await stop.wait()
    await runtime.stop()


def _forward_hup(procs: list[asyncio.subprocess.Process]) -> None:
    for p in procs:
        if p.returncode is None:
            p.send_signal(signal.SIGHUP)


async def supervise(argv: list[str], workers: int) -> int:
    """Run `workers` copies of this command as SO_REUSEPORT workers; 0 when all stopped cleanly."""
    cmd = [sys.executable, "-m", "switchboard.core.cli", *argv, "--worker"]
    procs = [await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
             for _ in range(workers)]
    ready = ""
    for proc in procs:
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode()
        if not line.startswith("switchboard: ready"):
            for p in procs:
                if p.returncode is None:
                    p.terminate()
            codes = await asyncio.gather(*(p.wait() for p in procs))
            return 2 if 2 in codes else 1  # 2: a worker could not listen (its line says why)
        ready = line.rstrip("\n")
    # SIGHUP (config reload) goes to every worker; the supervisor itself holds no config.
    # Handlers first, then the ready line (see _stop_signal).
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _forward_hup, procs)
    stopped = _stop_signal()
    print(f"{ready} workers={workers}", flush=True)
    stop = asyncio.ensure_future(stopped.wait())
    exits = [asyncio.ensure_future(p.wait()) for p in procs]
    await asyncio.wait([stop, *exits], return_when=asyncio.FIRST_COMPLETED)
    for p in procs:  # on a signal, or when one worker died: stop them all
        if p.returncode is None:
            p.terminate()
    codes = await asyncio.gather(*exits)
    stop.cancel()
    return 0 if stop.done() and not stop.cancelled() and not any(codes) else max(1, *codes)


def _reload_on_sighup(runtime: Runtime) -> None:
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            await runtime.reload()
        except ConfigError:
            pass  # logged by Runtime.reload; the running config keeps serving

    def on_hup() -> None:
        task = loop.create_task(reload())
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"switchboard: config error: {exc}", file=sys.stderr)
        return 2
    print(f"OK {path}: {len(config.channels)} channels, {len(config.keys)} keys, "
          f"{len(config.routes)} routes")
    return 0


def _event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version",
                        version=f"switchboard {importlib.metadata.version('switchboard')}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check-config", help="validate a config file and exit").add_argument(
        "file", help="YAML config file")
    for name, helptext in (("serve", "core and façade in one process"),
                           ("core", "the gRPC core alone"),
                           ("facade", "the REST façade alone")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", default=os.environ.get("SWITCHBOARD_CONFIG") or None,
                       help="YAML config file (default $SWITCHBOARD_CONFIG; serve: omit both for "
                            "the echo demo)")
        p.add_argument("--http", help="HTTP listen address, overrides listen.http")
        p.add_argument("--grpc", help="gRPC listen address, overrides listen.grpc")
        if name == "facade":
            p.add_argument("--core", required=True,
                           help="address of the core, e.g. 127.0.0.1:50051")
        p.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the ports with SO_REUSEPORT (default 1)")
        p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    register_admin_commands(sub)  # keys create|list|get|revoke, usage (core/cli_admin.py)
    args = parser.parse_args(argv)
    if args.cmd in ("keys", "usage"):
        return run_admin(args)
    if args.cmd == "check-config":
        return check_config(args.file)
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
    setup_logging(config)
    if args.workers > 1 and not args.worker:
        return _run_pool(args, config, list(sys.argv[1:] if argv is None else argv))
    with _event_loop_runner() as runner:
        try:
            runner.run(run(args.cmd, config, http=args.http, grpc_addr=args.grpc,
                           core_target=getattr(args, "core", None), reuse_port=args.worker))
        except ListenError as exc:  # port taken, bad address: one line, no traceback
            print(f"switchboard: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"switchboard: cannot start: {exc}", file=sys.stderr)
            return 1
    return 0


def _run_pool(args: argparse.Namespace, config: Config, argv: list[str]) -> int:
    from switchboard.core.runtime import split_address

    addrs = []
    if args.cmd in ("serve", "facade"):
        addrs.append(args.http or config.listen_http)
    if args.cmd in ("serve", "core"):
        addrs.append(args.grpc or config.listen_grpc)
    if any(split_address(a)[1] == 0 for a in addrs):
        print("switchboard: --workers > 1 needs fixed ports (not 0)", file=sys.stderr)
        return 2
    with _event_loop_runner() as runner:
        return runner.run(supervise(argv, args.workers))


if __name__ == "__main__":
    sys.exit(main())
