"""Starting and stopping a Switchboard process's servers: the gRPC core, the REST
façade, or both in one process. The CLI and the tests use this same code.

Drain on stop: health flips to NOT_SERVING, listeners close, in-flight requests get
`shutdown_grace_s` to finish, the rest are cancelled, then usage is flushed.
"""

from __future__ import annotations

import logging

import grpc
from aiohttp import web
from grpc_health.v1 import health

from core.config import Config
from core.gateway import Gateway
from core.server import build_grpc_server, mark_serving
from facade.app import create_app
from facade.transport import GrpcTransport, Transport

log = logging.getLogger("switchboard")


def split_address(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Runtime:
    """mode: "serve" (core + façade), "core" (gRPC only) or "facade" (REST → remote core)."""

    def __init__(self, mode: str, config: Config, *, http: str | None = None,
                 grpc_addr: str | None = None, core_target: str | None = None,
                 gateway: Gateway | None = None) -> None:
        self.mode = mode
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

    async def start(self) -> None:
        if self.mode in ("serve", "core"):
            if self.gateway is None:
                self.gateway = Gateway(self.config)
            self.grpc_server, port, self.health = build_grpc_server(self.gateway, self.grpc_addr)
            await self.grpc_server.start()
            await mark_serving(self.health, True)
            self.grpc_target = f"{split_address(self.grpc_addr)[0]}:{port}"
        if self.mode in ("serve", "facade"):
            self.transport = (self.gateway if self.gateway is not None
                              else GrpcTransport(self.core_target or ""))
            app = create_app(self.transport, max_body_bytes=self.config.max_body_bytes)
            self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                        shutdown_timeout=self.config.shutdown_grace_s)
            await self.runner.setup()
            host, port = split_address(self.http_addr)
            site = web.TCPSite(self.runner, host, port)
            await site.start()
            bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.http_url = f"http://{host}:{bound}"

    def ready_line(self) -> str:
        parts = []
        if self.http_url:
            parts.append(f"http={self.http_url.removeprefix('http://')}")
        if self.grpc_target:
            parts.append(f"grpc={self.grpc_target}")
        return "switchboard: ready " + " ".join(parts)

    async def stop(self) -> None:
        log.info("shutting down: draining in-flight requests for up to %gs",
                 self.config.shutdown_grace_s)
        if self.health is not None:
            await mark_serving(self.health, False)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.grpc_server is not None:
            await self.grpc_server.stop(self.config.shutdown_grace_s)
        if self.gateway is not None:
            await self.gateway.close()
        if isinstance(self.transport, GrpcTransport):
            await self.transport.close()
        log.info("stopped")
