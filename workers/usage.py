"""The usage service: counts tokens per tenant, key and model from the reply topic.

A consumer of the reply topic in its own group, off the request path: each
micro-batch of replies is one upsert (``kontext.store.usage.record``), idempotent per
job id, so a redelivered reply is never counted twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
from aiokafka import AIOKafkaProducer

from kontext.settings import Settings
from kontext.store import usage
from schemas.events import JobReply
from schemas.topics import Group
from workers.consumer import BatchConsumer
from workers.deadletter import DeadLetters
from workers.records import Record
from workers.services import ConsumerService, Resources, Service, service


class UsageRecorder:
    """Adds each replied job's prompt and completion tokens to its tenant's usage."""

    name = "usage"

    def __init__(self, settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer) -> None:
        self.pool = pool
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        counted: list[usage.Counted] = []
        for _, reply in await self.dead_letters.decode(records, JobReply.decode, "JobReply", sends):
            spent = reply.result.usage if reply.result is not None else None
            counted.append(
                usage.Counted(
                    job_id=reply.job_id,
                    prompt_tokens=spent.prompt_tokens if spent else 0,
                    completion_tokens=spent.completion_tokens if spent else 0,
                )
            )
        if counted:
            await usage.record(self.pool, counted)
        if sends:
            await asyncio.gather(*sends)


def groups(settings: Settings) -> list[Group]:
    return [settings.topics.group("usage", "usage", settings.topics.replies)]


@service("usage", groups)
async def usage_service(shared: Resources) -> list[Service]:
    settings = shared.settings
    [reads] = groups(settings)
    consumer = BatchConsumer(
        shared.consumer(reads),
        UsageRecorder(settings, shared.pool, shared.producer),
        max_size=settings.usage_batch_max_size,
        max_wait_ms=settings.usage_batch_max_wait_ms,
    )
    return [ConsumerService(consumer)]
