"""A real local webhook receiver that can be taken down and brought back on its port."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from uuid import UUID


class _Server(ThreadingHTTPServer):
    # Hundreds of deliveries arrive at once when the receiver comes back: with the
    # default backlog of 5, most connections would be reset before being accepted.
    request_queue_size = 1024


class WebhookReceiver:
    """Answers 204 to every POST; counts deliveries by ``webhook-id`` and by job id."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.by_webhook_id: Counter[str] = Counter()
        self.by_job: Counter[UUID] = Counter()
        self.first_delivery: dict[UUID, float] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver._count(self.headers.get("webhook-id", ""), body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the tally is the log."""

        server = _Server(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server

    def _count(self, webhook_id: str, body: bytes) -> None:
        job = UUID(json.loads(body)["data"]["id"])
        with self._lock:
            self.by_webhook_id[webhook_id] += 1
            self.by_job[job] += 1
            self.first_delivery.setdefault(job, time.time())

    def stop(self) -> None:
        """Close the listening socket: connections are refused until ``start()``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
