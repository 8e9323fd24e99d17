"""``GET /metrics`` (Prometheus text format) and the middleware that counts API requests.

Requests are labelled by route template (``/v1/jobs/{job_id}``, never the raw
path, so labels stay bounded), method and status code. ``/metrics`` needs an
operator key (it shows every tenant's traffic in aggregate); Prometheus scrapes
each service's own metrics port (``KONTEXT_METRICS_PORT``) on the internal
network instead, as ``deploy/prometheus.yml`` does.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kontext.metrics import HTTP_LATENCY, HTTP_REQUESTS
from producers.api.auth import Operator

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(principal: Operator) -> Response:
    """Every metric of this process, in the Prometheus text exposition format."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """Counts each HTTP request and times it, by route template, method and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(template, method, str(status)).inc()
            HTTP_LATENCY.labels(template, method).observe(time.perf_counter() - started)
