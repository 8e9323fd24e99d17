"""Health endpoints, which need no key: liveness and readiness."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from kontext.tasks import settle
from producers.api.state import state

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0


class Readiness(BaseModel):
    """Whether this replica can serve, and each dependency's answer (``ok``, or why not)."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str]


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers (liveness)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"model": Readiness, "description": "a dependency is unreachable"}},
)
async def readyz(request: Request, response: Response) -> Readiness:
    """Postgres and Kafka both answer within 2 s: send traffic here (readiness)."""
    api = await state(request)

    async def postgres() -> None:
        async with api.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def kafka() -> None:
        if not await api.producer.client.force_metadata_update():
            raise ConnectionError("no broker answered a metadata request")

    # Both at once, and never longer than the limit: a check that hangs (a server that
    # stopped answering) is left to end by itself, not waited for while it cleans up.
    running = {
        "postgres": asyncio.ensure_future(postgres()),
        "kafka": asyncio.ensure_future(kafka()),
    }
    await asyncio.wait(running.values(), timeout=CHECK_TIMEOUT_S)
    checks: dict[str, str] = {}
    for name, task in running.items():
        if not task.done():
            task.cancel()
            settle([task], log, f"the {name} readiness check", logging.DEBUG)
            checks[name] = "unavailable: TimeoutError"
        elif (exc := task.exception()) is not None:  # not ready; say which and why
            checks[name] = f"unavailable: {type(exc).__name__}"
        else:
            checks[name] = "ok"
    ready = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ready else 503
    return Readiness(status="ready" if ready else "unavailable", checks=checks)
