"""The FastAPI application: routes, error handling, limits, connections."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kontext import tracing
from kontext.connections import create_pool, create_producer
from kontext.settings import Settings
from kontext.store import ledger
from producers.api import (
    batches,
    chat,
    conversations,
    endpoints,
    errors,
    files,
    health,
    jobs,
    metrics,
    models,
    reviews,
    usage,
    webhooks,
)
from producers.api.dashboard import routes as dashboard
from producers.api.direct import DirectJobs
from producers.api.limits import BodySizeLimit
from producers.api.metrics import RequestMetrics
from producers.api.state import ApiState
from producers.api.waiters import JobWaiters
from producers.key_cache import KeyCache
from producers.policies import IntakePolicies


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await create_pool(settings)
        producer = create_producer(settings)
        await producer.start()
        waiters = JobWaiters(settings.dsn)
        waiters.start()
        app.state.keys = KeyCache(settings.dsn, settings.auth_cache_ttl_s)
        app.state.keys.start()
        policies = IntakePolicies(settings)
        await policies.start()
        app.state.api = ApiState(
            settings=settings,
            pool=pool,
            producer=producer,
            waiters=waiters,
            admitter=ledger.Admitter(pool),
        )
        app.state.api.chain = policies.chain
        try:
            yield
        finally:
            await app.state.keys.close()
            await policies.close()
            await waiters.close()
            await producer.stop()
            await pool.close()

    app = FastAPI(title="Kontext", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(conversations.router)
    app.include_router(webhooks.router)
    app.include_router(endpoints.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(usage.router)

    app.include_router(health.router)
    app.include_router(dashboard.router)
    app.include_router(reviews.router)
    app.include_router(metrics.router)

    # Innermost of ours: a submission is counted and size-limited like any request.
    app.add_middleware(DirectJobs, application=app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        larger={"/v1/files": files.body_limit(settings.files_max_bytes)},
    )
    app.add_middleware(RequestMetrics)  # outermost: counts every answer, 413s too
    if tracing.enabled():
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        # A server span per request, continuing a client's ``traceparent``.
        FastAPIInstrumentor.instrument_app(
            app, excluded_urls=TRACING_EXCLUDED, exclude_spans=["receive", "send"]
        )
    return app


TRACING_EXCLUDED = "/healthz,/readyz,/metrics,/dashboard"
"""Requests without a span: probes, scrapes and the dashboard's polling."""
