"""Health endpoints, the only ones that need no key: liveness and readiness."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from producers.api.state import state

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

    checks: dict[str, str] = {}
    for name, check in (("postgres", postgres), ("kafka", kafka)):
        try:
            await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
            checks[name] = "ok"
        except Exception as exc:  # any failure means: not ready; say which and why
            checks[name] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ready else 503
    return Readiness(status="ready" if ready else "unavailable", checks=checks)
