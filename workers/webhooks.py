"""The webhook dispatcher: turns replies into signed deliveries and retries them.

A consumer of the reply topic creates each job's delivery (one statement per
micro-batch, once per job) and, when the schedule's first delay is 0, makes the
first attempts at once, concurrently.
Failed attempts are never retried by sleeping in the consumer: the delivery's
next attempt time is stored in Postgres, and a scheduler loop in the same
service claims due deliveries in batches and attempts them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from kontext.settings import Settings
from kontext.ssrf import UrlGuard
from kontext.store import deliveries
from schemas.events import JobReply
from schemas.topics import Group
from workers.consumer import BatchConsumer
from workers.deadletter import DeadLetters
from workers.periodic import every
from workers.records import Record
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


class WebhookHandler:
    """Creates deliveries for replied jobs that carry a webhook, and attempts them."""

    name = "webhooks"

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer, sender: Sender
    ) -> None:
        self.pool = pool
        self.sender = sender
        self.lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        replies = await self.dead_letters.decode(records, JobReply.decode, "JobReply", sends)
        job_ids = [reply.job_id for _, reply in replies]
        if job_ids:
            async with self.pool.acquire() as conn:
                claimed = await deliveries.create(
                    conn, job_ids, self.sender.policy.first_delay, self.lease_s
                )
            if claimed:
                await attempt_all(self.pool, self.sender, claimed)
        if sends:
            await asyncio.gather(*sends)


class Scheduler:
    """Claims due deliveries (retries and redeliveries) in batches and attempts them."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, sender: Sender) -> None:
        self.pool = pool
        self.sender = sender
        self.batch = settings.webhook_claim_batch
        self.interval_s = settings.webhook_poll_interval_s
        self.lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        self.stopping = asyncio.Event()

    async def step(self) -> bool:
        """Attempt one claim of due deliveries; True if more may be due."""
        claimed = await deliveries.claim_due(self.pool, self.batch, self.lease_s)
        if claimed:
            await attempt_all(self.pool, self.sender, claimed)
        return len(claimed) == self.batch

    async def run(self) -> None:
        await every(self.interval_s, self.step, self.stopping, "webhook scheduler")


class WebhookService:
    """The ``webhooks`` service: the reply consumer and the retry scheduler, one client."""

    name = "webhooks"

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        consumer: AIOKafkaConsumer,
    ) -> None:
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
        self.consumer = BatchConsumer(
            consumer,
            WebhookHandler(settings, pool, producer, self.sender),
            max_size=settings.batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
        )
        self.scheduler = Scheduler(settings, pool, self.sender)

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.consumer.run())
                group.create_task(self.scheduler.run())
        finally:
            await self.sender.close()

    def ready(self) -> bool:
        return bool(self.consumer.consumer.assignment())

    async def stop(self) -> None:
        self.consumer.stop()
        self.scheduler.stopping.set()


def groups(settings: Settings) -> list[Group]:
    return [settings.topics.group("webhooks", "webhooks", settings.topics.replies)]


@service("webhooks", groups)
async def webhooks_service(shared: Resources) -> list[Service]:
    [reads] = groups(shared.settings)
    consumer = shared.consumer(reads)
    return [WebhookService(shared.settings, shared.pool, shared.producer, consumer)]
