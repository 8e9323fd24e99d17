"""The webhook dispatcher: attempts due deliveries, signed, and retries them.

Deliveries are created in Postgres with the job's final state, by the recorder's
statement (once per job) or with a batch's end event, which wake this service
through a NOTIFY. It claims due deliveries in batches, attempts them
concurrently, and records every outcome at once. A failed attempt is never
retried by sleeping: its next attempt time is stored, and the scheduler claims
it when due (it also looks every ``webhook_poll_interval_s``, in case a
notification was lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import asyncpg

from kontext.listen import listen_forever
from kontext.settings import Settings
from kontext.ssrf import UrlGuard
from kontext.store import deliveries
from workers.periodic import every
from workers.retries import RetryPolicy
from workers.sender import Sender
from workers.services import Resources, Service, service

log = logging.getLogger(__name__)

LEASE_MARGIN_S = 30.0


async def attempt_all(
    pool: asyncpg.Pool, sender: Sender, claimed: Sequence[deliveries.Delivery]
) -> None:
    """Attempt the claimed deliveries concurrently, then record every outcome at once."""
    attempts = await asyncio.gather(*(sender.attempt(d) for d in claimed))
    await deliveries.record(pool, attempts)
    for attempt in attempts:
        if attempt.error is not None:
            state = "dead" if attempt.retry_in_s is None else f"retry in {attempt.retry_in_s:.1f}s"
            log.info(
                "webhook %s attempt %d failed (%s): %s",
                attempt.delivery_id,
                attempt.attempt,
                state,
                attempt.error,
            )


class Scheduler:
    """Claims due deliveries in batches and attempts them: when woken by a NOTIFY
    that deliveries were created, and every ``webhook_poll_interval_s``."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, sender: Sender) -> None:
        self.settings = settings
        self.pool = pool
        self.sender = sender
        self.batch = settings.webhook_claim_batch
        self.interval_s = settings.webhook_poll_interval_s
        self.lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        self.stopping = asyncio.Event()
        self.woken = asyncio.Event()

    async def step(self) -> bool:
        """Attempt one claim of due deliveries; True if more may be due."""
        claimed = await deliveries.claim_due(self.pool, self.batch, self.lease_s)
        if claimed:
            await attempt_all(self.pool, self.sender, claimed)
        return len(claimed) == self.batch

    async def run(self) -> None:
        listener = asyncio.create_task(
            listen_forever(
                self.settings.dsn,
                deliveries.CHANNEL,
                lambda *_: self.woken.set(),
                self.woken.set,
                "webhook deliveries",
            )
        )
        try:
            await every(
                self.interval_s, self.step, self.stopping, "webhook scheduler", wake=self.woken
            )
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


class WebhookService:
    """The ``webhooks`` service: the scheduler and its HTTP client."""

    name = "webhooks"

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        policy = RetryPolicy(
            settings.webhook_retry_schedule_s,
            settings.webhook_max_attempts,
            settings.webhook_retry_jitter,
        )
        self.sender = Sender(
            UrlGuard(settings.webhook_allow_hosts),
            settings.webhook_secret,
            policy,
            timeout_s=settings.webhook_timeout_s,
            max_connections=settings.webhook_max_connections,
        )
        self.scheduler = Scheduler(settings, pool, self.sender)
        self.started = False

    async def run(self) -> None:
        self.started = True
        try:
            await self.scheduler.run()
        finally:
            await self.sender.close()

    def ready(self) -> bool:
        return self.started

    async def stop(self) -> None:
        self.scheduler.stopping.set()


@service("webhooks")
async def webhooks_service(shared: Resources) -> list[Service]:
    return [WebhookService(shared.settings, shared.pool)]
