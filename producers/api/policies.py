"""The API's side of the policy chain: the ``check_submit`` hook's inputs and errors.

``LimitFollower`` keeps this replica's copy of the limiter's published
per-tenant state (the limits topic, read whole by every replica), so refusing
a tenant whose window is full costs no database or broker round trip on the
request path. A ``Refused`` submission answers with the refusal's status,
``{"error": {"code", "message"}}`` and, when known, ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from kontext.settings import Settings
from producers.api.errors import error_response
from schemas.api import ApiError
from schemas.limits import TenantLimitStatus
from workers.policies.base import Refused
from workers.policies.chain import PolicyChain
from workers.policies.compose import ChainParts, build_chain

log = logging.getLogger(__name__)


class LimitFollower:
    """The latest TenantLimitStatus per tenant, read from the limits topic."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.statuses: dict[str, TenantLimitStatus] = {}
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    def status(self, tenant_id: str) -> TenantLimitStatus | None:
        return self.statuses.get(tenant_id)

    async def start(self) -> None:
        # No group: every replica reads every partition, from the start (the last
        # status of each tenant wins).
        self._consumer = AIOKafkaConsumer(
            self.settings.topics.limits,
            bootstrap_servers=self.settings.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._follow(self._consumer), name="limit-follower")

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                fetched = await consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log.warning("limits topic: %s; retrying", exc)
                await asyncio.sleep(1)
                continue
            for messages in fetched.values():
                for message in messages:
                    try:
                        status = TenantLimitStatus.decode(message.value)
                    except (ValidationError, ValueError):
                        continue
                    self.statuses[status.tenant_id] = status

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


class ApiPolicies:
    """The chain this API process runs, and what feeds it."""

    def __init__(self, settings: Settings) -> None:
        self.follower = LimitFollower(settings) if settings.policy_limits else None
        self.chain: PolicyChain = build_chain(settings, ChainParts(limit_view=self.follower))

    async def start(self) -> None:
        if self.follower is not None:
            await self.follower.start()

    async def close(self) -> None:
        await self.chain.close()
        if self.follower is not None:
            await self.follower.close()


async def _refused(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refused)
    refusal = exc.refusal
    headers = None
    if refusal.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(refusal.retry_after_s)))}
    return error_response(
        refusal.status, ApiError(code=refusal.code, message=refusal.message), headers=headers
    )


def install_refusals(app: FastAPI) -> None:
    app.add_exception_handler(Refused, _refused)
