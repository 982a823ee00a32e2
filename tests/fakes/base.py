"""What every fake upstream shares: an aiohttp app on 127.0.0.1 port 0 and the logs of
what it received (bodies, headers, clients that went away)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.fakes.scenario import USAGE


class LoopbackFake:
    """Subclasses add their routes in `routes`; `start` returns the channel base_url."""

    base_path = ""  # appended to http://127.0.0.1:PORT in the returned base_url

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.disconnects = 0  # requests whose client (the gateway) went away first
        self.USAGE = USAGE
        self.url = ""
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def log(self, request: web.Request, body: dict[str, Any]) -> None:
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})

    async def start(self) -> str:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url + self.base_path

    async def close(self) -> None:
        if self._runner:
            await self._runner.cleanup()
