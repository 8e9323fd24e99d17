"""The batches service: keeps batch counts current and closes batches whose jobs are done.

A consumer of the reply topic (its own group) recounts the batches of each
micro-batch's jobs in one statement; a batch with no job left to run goes to
``finalizing``, then ``completed``. A sweep loop recounts every open batch
(cancellations fail jobs that never reply), expires overdue ones, and closes any
left in ``finalizing``. A batch that ended gets one delivery of its end event
for its webhook and one per subscribed endpoint of its tenant, which the
webhooks service attempts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from kontext.settings import Settings
from kontext.store import batches, deliveries
from schemas.events import JobReply, utcnow
from schemas.limits import Released
from schemas.topics import Group
from workers.consumer import BatchConsumer
from workers.deadletter import DeadLetters
from workers.periodic import every
from workers.records import Record
from workers.services import Resources, Service, service

log = logging.getLogger(__name__)

RELEASE_CHUNK = 1000
"""Job ids per ``Released`` event (about 40 KB)."""


async def release_holds(
    settings: Settings, producer: AIOKafkaProducer, jobs: Sequence[batches.Unstarted]
) -> None:
    """Tell each tenant's limiter that these batch jobs ended before running, so the
    budget they hold is released (nothing when limits are off). The limiter reads its
    topic in order, so this comes after the lines' own admission events."""
    if not settings.policy_limits or not jobs:
        return
    by_tenant: dict[str, list[UUID]] = {}
    for job in jobs:
        by_tenant.setdefault(job.tenant_id, []).append(job.job_id)
    sends: list[asyncio.Future[object]] = []
    try:
        for tenant_id, job_ids in by_tenant.items():
            for start in range(0, len(job_ids), RELEASE_CHUNK):
                chunk = job_ids[start : start + RELEASE_CHUNK]
                event = Released(tenant_id=tenant_id, job_ids=chunk).encode()
                key = tenant_id.encode()
                sends.append(await producer.send(settings.topics.admission, event, key=key))
        await asyncio.gather(*sends)
    except KafkaError as exc:  # the jobs stay failed; only their holds stay too
        log.error("could not release the budget held by %d jobs: %s", len(jobs), exc)


def end_event(row: batches.BatchRow) -> deliveries.BatchEvent:
    """``batch.completed`` (or ``.failed``, ``.cancelled``, ``.expired``); the data is the
    batch as ``GET /v1/batches/{id}`` shows it, without the bad-line list. ``url`` is
    the batch's own webhook, if any (the tenant's endpoints get the event too)."""
    event = f"batch.{row.status}"
    data = row.view().model_dump(mode="json", exclude={"errors"})
    return deliveries.BatchEvent(
        batch_id=row.id,
        type=event,
        url=row.webhook["url"] if row.webhook else None,
        secret=row.webhook.get("secret") if row.webhook else None,
        payload={"type": event, "timestamp": utcnow().isoformat(), "data": data},
    )


async def close(pool: asyncpg.Pool, finalizing: Sequence[UUID] | None, delay: float) -> None:
    """Complete finalizing batches (these, or all) and queue the end events of ended ones."""
    async with pool.acquire() as conn, conn.transaction():
        await batches.complete(conn, finalizing)
        ended = await batches.unnotified(conn)
        if ended:
            await deliveries.create_for_batches(conn, [end_event(r) for r in ended], delay)
            await batches.mark_notified(conn, [r.id for r in ended])


class BatchTracker:
    """Recounts the batches of replied jobs; closes those with nothing left to run."""

    name = "batches"

    def __init__(self, settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer) -> None:
        self.pool = pool
        self.first_delay_s = settings.webhook_retry_schedule_s[0]
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        replies = await self.dead_letters.decode(records, JobReply.decode, "JobReply", sends)
        job_ids = [reply.job_id for _, reply in replies]
        if job_ids:
            async with self.pool.acquire() as conn:
                finalizing = await batches.refresh(conn, job_ids=job_ids)
            if finalizing:
                await close(self.pool, finalizing, self.first_delay_s)
        if sends:
            await asyncio.gather(*sends)


class Sweeper:
    """Every few seconds: expire overdue batches (releasing the budget their unstarted
    jobs held), recount open ones, close finished ones."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.producer = producer
        self.pool = pool
        self.interval_s = settings.backfill_sweep_interval_s
        self.first_delay_s = settings.webhook_retry_schedule_s[0]
        self.stopping = asyncio.Event()

    async def sweep(self) -> None:
        async with self.pool.acquire() as conn:
            expired, unstarted = await batches.expire(conn)
            await batches.refresh(conn, batch_ids=expired)
        await release_holds(self.settings, self.producer, unstarted)
        await close(self.pool, None, self.first_delay_s)

    async def run(self) -> None:
        await every(self.interval_s, self.sweep, self.stopping, "batch sweep")


class BatchService:
    """The ``batches`` service: the reply consumer and the sweep loop."""

    name = "batches"

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        consumer: AIOKafkaConsumer,
    ) -> None:
        self.consumer = BatchConsumer(
            consumer,
            BatchTracker(settings, pool, producer),
            max_size=settings.backfill_chunk_size,
            max_wait_ms=settings.batch_max_wait_ms,
        )
        self.sweeper = Sweeper(settings, pool, producer)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.consumer.run())
            group.create_task(self.sweeper.run())

    def ready(self) -> bool:
        return self.consumer.ready()

    async def stop(self) -> None:
        self.consumer.stop()
        self.sweeper.stopping.set()


def groups(settings: Settings) -> list[Group]:
    return [settings.topics.group("batches", "batches", settings.topics.replies)]


@service("batches", groups)
async def batches_service(shared: Resources) -> list[Service]:
    [reads] = groups(shared.settings)
    consumer = shared.consumer(reads)
    return [BatchService(shared.settings, shared.pool, shared.producer, consumer)]
