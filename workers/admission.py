"""The admission stage: the single writer of each tenant's limits and budget.

API replicas publish submissions to the admission topic keyed by tenant id, so
every submission of a tenant lands on one partition and is decided by the one
stream processor that owns it, in order, against that tenant's state in a
faust table (changelogged, so a restarted or rebalanced processor resumes it).
A job is one ``Submitted`` event; a batch's intake chunk is one ``SubmittedMany``
(its lines decided in order, as if each came alone), so a backfill puts a few
events, not thousands, ahead of its tenant's next interactive submission.
Per micro-batch it settles finished jobs' reservations (and releases those of a
batch's jobs cancelled or expired before they ran, skipping batch lines already
final in the database), runs the policy chain's
``admit`` hook, forwards admitted requests to their lane's requests topic
(interactive ones first; keyed by conversation, as before), fails refused ones
through the completions topic (so they are recorded, replied and webhooked like
any failure), and publishes the tenants' new state for the API replicas to
refuse early.

The settler feeds it: it reads the completions topic and sends each job's
actual token use to the admission topic, keyed by the job's tenant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from kontext.settings import Settings
from kontext.store import ledger
from schemas.events import ErrorInfo, JobCompletion, JobRequest
from schemas.limits import (
    ADMISSION_EVENT,
    Released,
    Settled,
    Submitted,
    SubmittedMany,
    TenantLimitStatus,
)
from schemas.topics import Group
from workers import completions
from workers.consumer import BatchConsumer
from workers.deadletter import DeadLetters
from workers.policies.chain import PolicyChain
from workers.policies.compose import ChainParts, build_chain
from workers.policies.limits import LimitLedger, LimitsPolicy
from workers.records import Record
from workers.services import ConsumerService, Resources, Service, StreamService, service
from workers.streams import StreamProcessor

log = logging.getLogger(__name__)

TABLE = "tenant-limits"


class Admission:
    """Batch handler of the admission topic (see the module docstring)."""

    name = "admission"

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.producer = producer
        self.pool = pool
        self.chain = PolicyChain([])
        self.ledger: LimitLedger | None = None
        self.published: dict[str, TenantLimitStatus] = {}
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)

    def use(self, chain: PolicyChain) -> None:
        self.chain = chain
        limits = next((s for s in chain.steps if isinstance(s, LimitsPolicy)), None)
        self.ledger = limits.ledger if limits is not None else None

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        requests: dict[object, JobRequest] = {}
        lines: list[UUID] = []  # the batch lines among them
        settlements: list[Settled] = []
        events = await self.dead_letters.decode(
            records, lambda raw: ADMISSION_EVENT.validate_json(raw or b""), "admission event", sends
        )
        for _, event in events:
            if isinstance(event, Submitted):
                requests.setdefault(event.request.job_id, event.request)
            elif isinstance(event, SubmittedMany):
                for request in event.requests:
                    requests.setdefault(request.job_id, request)
                    lines.append(request.job_id)
            elif isinstance(event, Released):  # ended before running: nothing spent
                for job_id in event.job_ids:
                    settlements.append(Settled(job_id=job_id, tenant_id=event.tenant_id, tokens=0))
                    # Submitted in this very micro-batch: it ended already, never hold it.
                    requests.pop(job_id, None)
            else:
                settlements.append(event)
        if lines:
            # Lines a cancel or an expiry failed before their chunk got here (its release
            # came first): never hold nor forward them. One query per micro-batch.
            for job_id in await ledger.ended(self.pool, lines):
                requests.pop(job_id, None)
        now = time.time()
        touched: set[str] = set()
        if self.ledger is not None:
            await self.ledger.limits.refresh()
            if settlements:
                settled = self.ledger.settle(settlements, now)
                await self.ledger.limits.save_spent(self.ledger.spent(settled))
                touched |= settled
        pending = list(requests.values())
        refused = await self.chain.admit(pending) if pending else {}
        topics = self.settings.topics
        # Decided in arrival order; sent interactive first, so a submission decided
        # alongside a batch's chunk does not queue behind its lines in the producer.
        for request in sorted(pending, key=lambda r: r.priority != "interactive"):
            touched.add(request.tenant_id)
            key = request.conversation_id.encode()
            refusal = refused.get(request.job_id)
            if refusal is None:
                lane = topics.requests_lane(request.priority)
                sends.append(await self.producer.send(lane, request.encode(), key=key))
                continue
            error = ErrorInfo(code=refusal.code, message=refusal.message)
            failed = JobCompletion.failure(request, error)
            sends += await completions.publish(self.settings, self.producer, [failed])
        if self.ledger is not None:
            for tenant_id in touched:
                status = self.ledger.status(tenant_id, now)
                if self.published.get(tenant_id) != status:
                    self.published[tenant_id] = status
                    sends.append(
                        await self.producer.send(
                            topics.limits, status.encode(), key=tenant_id.encode()
                        )
                    )
        if sends:
            await asyncio.gather(*sends)


class Settler:
    """Sends each completion's actual token use to its tenant's limiter."""

    name = "settler"

    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.producer = producer

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        for record in records:
            try:
                done = JobCompletion.decode(record.value)
            except (ValidationError, ValueError):
                continue  # the recorder dead-letters it
            settled = Settled(
                job_id=done.job_id,
                tenant_id=done.tenant_id,
                tokens=done.usage.total_tokens if done.usage is not None else 0,
            )
            sends.append(
                await self.producer.send(
                    self.settings.topics.admission,
                    settled.encode(),
                    key=done.tenant_id.encode(),
                )
            )
        if sends:
            await asyncio.gather(*sends)


def admission_processor(
    settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer, group: Group
) -> StreamProcessor:
    """The admission stream processor, with its tenant table and policy chain."""
    handler = Admission(settings, producer, pool)
    batching = settings.model_copy(
        update={
            "batch_max_wait_ms": settings.admission_batch_wait_ms,
            "batch_max_size": settings.admission_batch_max_size,
        }
    )
    processor = StreamProcessor(batching, group, handler)
    # The table is keyed like the topic (tenant id bytes, default partitioner), so each
    # tenant's state lives in the changelog partition of the topic partition that owns it.
    table = processor.app.Table(
        TABLE,
        default=None,
        partitions=settings.topic_partitions,
        use_partitioner=True,
        key_type=bytes,  # raw keys; values are JSON
    )
    handler.use(build_chain(settings, ChainParts(pool=pool, limit_state=table)))
    return processor


def groups(settings: Settings) -> list[Group]:
    """The limiter reads the admission topic; the settler the completions (limits on)."""
    if not settings.policy_limits:
        return []
    topics = settings.topics
    return [
        topics.group("admission", "admission", topics.admission),
        topics.group("settler", "settler", topics.completions),
    ]


@service("admission", groups)
async def admission_service(shared: Resources) -> list[Service]:
    settings = shared.settings
    if not settings.policy_limits:
        return []
    admit, settle = groups(settings)
    settler = BatchConsumer(
        shared.consumer(settle),
        Settler(settings, shared.producer),
        max_size=settings.batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
    )
    processor = admission_processor(settings, shared.pool, shared.producer, admit)
    return [StreamService(processor), ConsumerService(settler)]
