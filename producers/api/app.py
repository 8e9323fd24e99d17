"""The FastAPI application: routes, error handling, limits, connections."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kontext.connections import create_pool, create_producer
from kontext.settings import Settings
from producers.api import batches, conversations, errors, health, jobs, webhooks
from producers.api.limits import BodySizeLimit
from producers.api.state import ApiState
from producers.api.waiters import JobWaiters


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await create_pool(settings)
        producer = create_producer(settings)
        await producer.start()
        waiters = JobWaiters(settings.dsn)
        waiters.start()
        app.state.api = ApiState(settings=settings, pool=pool, producer=producer, waiters=waiters)
        try:
            yield
        finally:
            await waiters.close()
            await producer.stop()
            await pool.close()

    app = FastAPI(title="Kontext", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(conversations.router)
    app.include_router(webhooks.router)
    app.include_router(batches.router)

    app.include_router(health.router)

    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        larger={"/v1/batches": settings.backfill_max_bytes},
    )
    return app
