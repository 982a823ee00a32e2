"""Starting and stopping a Switchboard process's servers: the gRPC core, the REST
façade, or both in one process. The CLI and the tests use this same code.

Drain on stop: health flips to NOT_SERVING and both listeners stop accepting at once;
in-flight requests get `shutdown_grace_s` to finish; then every request still waiting
on an upstream ends with UNAVAILABLE `server_shutting_down` (open REST streams get it
as a final SSE error event, gRPC calls as their status); then usage is flushed.
"""

from __future__ import annotations

import asyncio
import logging
import os

import grpc
from aiohttp import web
from grpc_health.v1 import health

from switchboard.core.config import Config
from switchboard.core.errors import GatewayError
from switchboard.core.gateway import Gateway
from switchboard.core.health import Check, Readiness, check_grpc_core, check_redis, check_store
from switchboard.core.logs import install_redaction, update_secrets
from switchboard.core.metrics import Metrics
from switchboard.core.reload import reload_from_file
from switchboard.core.server import ListenError, build_grpc_server, check_bindable, mark_serving
from switchboard.core.state import open_gateway
from switchboard.facade.app import create_app, create_ops_app
from switchboard.facade.guard import GuardedRunner
from switchboard.facade.transport import GrpcTransport, Transport

log = logging.getLogger("switchboard")

# aiohttp and grpc.aio cancel whatever is left this long after the grace period; by then
# the router has already ended those requests with a proper error (see stop()).
_DRAIN_MARGIN_S = 2.0


def split_address(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Runtime:
    """mode: "serve" (core + façade), "core" (gRPC only) or "facade" (REST → remote core)."""

    def __init__(self, mode: str, config: Config, *, http: str | None = None,
                 grpc_addr: str | None = None, core_target: str | None = None,
                 gateway: Gateway | None = None, reuse_port: bool = False) -> None:
        self.mode = mode
        # SO_REUSEPORT on both listeners, so `serve --workers N` processes share the ports.
        self.reuse_port = reuse_port
        self.config = config
        self.http_addr = http or config.listen_http
        self.grpc_addr = grpc_addr or config.listen_grpc
        self.core_target = core_target
        self.gateway = gateway
        self.grpc_server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self.runner: web.AppRunner | None = None
        self.transport: Transport | None = None
        self.http_url = ""       # http://host:port once started
        self.grpc_target = ""    # host:port once started
        # `core` serves /healthz /readyz /metrics over HTTP only when --http is given.
        self._ops_http = http is not None
        self.draining = False
        self._process_metrics: Metrics | None = None

    async def start(self) -> None:
        """Start the listeners; if one cannot start, whatever did is stopped again
        before the error propagates (a half-started process would never exit)."""
        try:
            await self._start()
        except BaseException:
            await self._undo_start()
            raise

    async def _undo_start(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.grpc_server is not None:
            await self.grpc_server.stop(0)
        if self.gateway is not None:
            await self.gateway.close()
        if isinstance(self.transport, GrpcTransport):
            await self.transport.close()

    async def _start(self) -> None:
        # Whoever set up logging (the CLI, an embedding app, pytest), no handler may
        # write a secret: every handler gets the redaction filter (core/logs.py).
        update_secrets(self.config)
        install_redaction()
        if self.mode in ("serve", "core"):
            if self.gateway is None:
                # Store, usage ledger and limiter from the config (core/state.py).
                self.gateway = await open_gateway(self.config)
            # Off the loop: it may resolve a host name.
            await asyncio.to_thread(check_bindable, "gRPC", self.grpc_addr,
                                    reuse_port=self.reuse_port)
            self.grpc_server, port, self.health = build_grpc_server(
                self.gateway, self.grpc_addr, reuse_port=self.reuse_port,
                limits=self.config.server)
            await self.grpc_server.start()
            await mark_serving(self.health, True)
            self.grpc_target = f"{split_address(self.grpc_addr)[0]}:{port}"
        if self.mode in ("serve", "facade") or self._ops_http:
            if self.mode == "core":
                app = create_ops_app(self)
            else:
                self.transport = (self.gateway if self.gateway is not None
                                  else GrpcTransport(self.core_target or ""))
                app = create_app(self.transport, max_body_bytes=self.config.max_body_bytes,
                                 ops=self)
            # Request deadlines, a connection cap and a small write buffer per
            # connection: what a slow client may cost (facade/guard.py).
            self.runner = GuardedRunner(app, settings=self.config.server,
                                        handler_cancellation=True, access_log=None,
                                        shutdown_timeout=self.config.shutdown_grace_s
                                        + _DRAIN_MARGIN_S)
            await self.runner.setup()
            host, port = split_address(self.http_addr)
            # A deep accept queue: a burst of connections (1,000 clients opening streams at
            # once) must not overflow aiohttp's default of 128 into 1 s SYN retransmits.
            site = web.TCPSite(self.runner, host, port, reuse_port=self.reuse_port or None,
                               backlog=4096)
            await asyncio.to_thread(check_bindable, "HTTP", self.http_addr,
                                    reuse_port=self.reuse_port)
            try:
                await site.start()
            except OSError as exc:  # lost a race for the port after the check
                raise ListenError("HTTP", self.http_addr,
                                  os.strerror(exc.errno) if exc.errno else str(exc)) from None
            bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.http_url = f"http://{host}:{bound}"

    # ---- operations: /readyz, /metrics (facade/app.py), reload (SIGHUP, admin API) ----

    def readiness(self) -> Readiness:
        checks: dict[str, Check] = {}
        if self.gateway is not None:
            gateway = self.gateway

            async def core() -> None:
                if gateway.router is None:
                    raise RuntimeError("no router")
            checks["core"] = core
            if self.config.store:
                checks["store"] = lambda: check_store(self.config.store)
        elif isinstance(self.transport, GrpcTransport):
            channel = self.transport.channel
            checks["core"] = lambda: check_grpc_core(channel)
        if self.config.limits.startswith(("redis://", "rediss://")):
            checks["redis"] = lambda: check_redis(self.config.limits)
        return Readiness(checks, draining=lambda: self.draining)

    async def ready(self) -> tuple[bool, dict[str, str]]:
        return await self.readiness().run()

    async def metrics(self) -> tuple[bytes, str]:
        if self.gateway is not None:
            return await self.gateway.observer.scrape()
        if self._process_metrics is None:  # façade alone: the core has the request metrics
            self._process_metrics = Metrics()
        return self._process_metrics.exposition()

    async def reload(self, path: str | None = None) -> Config:
        """Re-read the config file (default: the one we started from) and apply its
        channels, keys and routes (core/reload.py). A config that does not load or
        build raises ConfigError and the current one keeps serving."""
        if self.gateway is None:
            log.info("config reload: the façade alone has no channels, keys or routes to apply")
            return self.config
        self.config = await reload_from_file(self.gateway, path)
        return self.config

    def ready_line(self) -> str:
        parts = []
        if self.http_url:
            parts.append(f"http={self.http_url.removeprefix('http://')}")
        if self.grpc_target:
            parts.append(f"grpc={self.grpc_target}")
        return "switchboard: ready " + " ".join(parts)

    async def stop(self) -> None:
        self.draining = True
        log.info("shutting down: draining in-flight requests for up to %gs",
                 self.config.shutdown_grace_s)
        if self.health is not None:
            await mark_serving(self.health, False)
        await self._drain(self.config.shutdown_grace_s)
        if self.gateway is not None:
            await self.gateway.close()
        if isinstance(self.transport, GrpcTransport):
            await self.transport.close()
        log.info("stopped")

    async def _drain(self, grace: float) -> None:
        """Both surfaces stop accepting together (sequential stops would let one keep
        taking new work while the other drains); after `grace` the router ends what is
        left with a clear error instead of a bare cancellation."""
        stops = []
        if self.runner is not None:
            stops.append(self.runner.cleanup())
        if self.grpc_server is not None:
            stops.append(self.grpc_server.stop(grace + _DRAIN_MARGIN_S))
        if not stops:
            return
        drained = asyncio.ensure_future(asyncio.gather(*stops))
        done, _ = await asyncio.wait([drained], timeout=grace)
        if not done:
            error = GatewayError(
                grpc.StatusCode.UNAVAILABLE,
                f"The server is shutting down and the request did not finish within the "
                f"{grace:g}s drain period; retry it.", code="server_shutting_down")
            n = 0
            if self.gateway is not None:
                n = self.gateway.router.abort_inflight(error)
            elif isinstance(self.transport, GrpcTransport):
                n = self.transport.abort_inflight(error)
            log.warning("drain period over: ended %d in-flight request(s)", n)
        await drained
