"""The API as a service of a process: uvicorn serving the app on the configured port."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from kontext.ports import API_PORT, cannot_listen
from kontext.settings import Settings
from workers.services import Resources, Service, service


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiService:
    name = "api"

    def __init__(self, settings: Settings) -> None:
        from producers.api.app import create_app  # a worker process never loads the app

        config = uvicorn.Config(
            create_app(settings),
            log_level="warning",
            lifespan="on",
            access_log=False,
            http="httptools",
            # Longer than clients keep an idle connection (httpx: 5 s), so a client
            # never sends on a connection the server is closing.
            timeout_keep_alive=30,
        )
        self.server = _Server(config)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((settings.api_host, settings.api_port))
        except OSError as exc:
            self.socket.close()
            raise cannot_listen(settings.api_host, settings.api_port, API_PORT, exc) from None
        self.port: int = self.socket.getsockname()[1]

    async def run(self) -> None:
        await self.server.serve(sockets=[self.socket])

    def ready(self) -> bool:
        return self.server.started

    async def stop(self) -> None:
        self.server.should_exit = True


@service("api", shared=False)
async def api_service(shared: Resources) -> list[Service]:
    """The HTTP API (it opens its own pool and producer)."""
    return [ApiService(shared.settings)]
