"""A local OTLP/HTTP trace receiver for ``kontext bench --trace``: it takes every
export the stack sends and keeps only counts (no decoding), so the CPU a run spends
on tracing is the stack's own, not a collector's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web


@dataclass
class TraceSink:
    """Where the stack exports its spans (``url`` for ``OTEL_EXPORTER_OTLP_ENDPOINT``)."""

    url: str = ""
    exports: int = 0
    received_bytes: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.received_bytes += len(await request.read())
        self.exports += 1
        # An empty body is an ExportTraceServiceResponse with every field at its default.
        return web.Response(body=b"", content_type="application/x-protobuf")


@asynccontextmanager
async def sink() -> AsyncIterator[TraceSink]:
    """A receiver on a free local port until the block ends."""
    found = TraceSink()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    found.url = f"http://{host}:{port}"
    try:
        yield found
    finally:
        await runner.cleanup()
