"""A real local webhook receiver for the tests: an aiohttp server on 127.0.0.1."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """A webhook endpoint per name; each can be told to fail (503) a number of times."""

    url: str = ""
    calls: defaultdict[str, list[Call]] = field(default_factory=lambda: defaultdict(list))
    failures: dict[str, int] = field(default_factory=dict)
    """Failures left per name; negative: fail for ever."""

    def hook(self, name: str) -> str:
        return f"{self.url}/hooks/{name}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.calls[name].append(Call(dict(request.headers), await request.read()))
        if name.startswith("redirect"):
            raise web.HTTPFound(self.hook("elsewhere"))
        left = self.failures.get(name, 0)
        if left:
            self.failures[name] = left - 1 if left > 0 else left
            return web.Response(status=503, text="receiver down")
        return web.Response(status=204)


@asynccontextmanager
async def listening(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free local port until the block ends; yields its URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serving() -> AsyncIterator[Receiver]:
    """A receiver listening on a free local port until the block ends."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/{name}", receiver.handle)
    async with listening(app) as url:
        receiver.url = url
        yield receiver
