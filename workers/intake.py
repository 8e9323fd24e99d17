"""The one way a job's request enters the pipeline.

API submissions, batch lines, summaries, the recorder's held turns and the
reconciler's re-drives all publish through ``publish``: it alone chooses the
topic (the tenant's limiter, or the request's lane) and the key. It takes
``JobRequest`` models, whose webhook has no place for a secret, so no request
on any topic ever carries one. ``enqueue`` records a new job in the ledger
first (the secret goes to its own column there), then publishes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from kontext.settings import Settings
from kontext.store import ledger
from schemas.events import ErrorInfo, JobRequest
from schemas.limits import Submitted, SubmittedMany

log = logging.getLogger(__name__)

QUEUE_UNAVAILABLE = ErrorInfo(code="enqueue_failed", message="the queue is unavailable")


class EnqueueFailed(Exception):
    """The job was recorded but could not be published; it is marked failed."""


def admission_events(requests: Sequence[JobRequest], max_bytes: int) -> list[bytes]:
    """One tenant's requests as few ``SubmittedMany`` events as fit ``max_bytes`` each,
    in order (a request larger than that goes alone)."""
    envelope = len(SubmittedMany.model_construct(requests=[]).encode())
    events: list[bytes] = []
    group: list[JobRequest] = []
    size = envelope
    for request in requests:
        length = len(request.encode()) + 1  # its comma in the list
        if group and size + length > max_bytes:
            events.append(SubmittedMany(requests=group).encode())
            group, size = [], envelope
        group.append(request)
        size += length
    if group:
        events.append(SubmittedMany(requests=group).encode())
    return events


async def publish(
    settings: Settings,
    producer: AIOKafkaProducer,
    requests: Sequence[JobRequest],
    *,
    admitted: bool = False,
) -> list[asyncio.Future[object]]:
    """Queue the sends that put ``requests`` into the pipeline; await the futures
    for delivery.

    New work (``admitted`` False) goes to its tenant's limiter when limits are on
    (which forwards a job it admitted before without counting it twice): an
    interactive job as one ``Submitted`` event, a tenant's background jobs (batch
    lines, summaries) as few ``SubmittedMany`` events. Work the limiter already
    let through (a turn held behind the one before it), or any work when limits
    are off, goes to its lane's requests topic, keyed by conversation.
    """
    topics = settings.topics
    sends: list[asyncio.Future[object]] = []
    if settings.policy_limits and not admitted:
        background: dict[str, list[JobRequest]] = {}
        for request in requests:
            if request.priority == "background":
                background.setdefault(request.tenant_id, []).append(request)
                continue
            event = Submitted(request=request).encode()
            key = request.tenant_id.encode()
            sends.append(await producer.send(topics.admission, event, key=key))
        for tenant_id, group in background.items():
            key = tenant_id.encode()
            for event in admission_events(group, settings.admission_event_max_bytes):
                sends.append(await producer.send(topics.admission, event, key=key))
        return sends
    for request in requests:
        topic = topics.requests_lane(request.priority)
        key = request.conversation_id.encode()
        sends.append(await producer.send(topic, request.encode(), key=key))
    return sends


async def enqueue(
    settings: Settings,
    pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    request: JobRequest,
    idempotency_key: str | None,
    webhook_secret: str | None = None,
) -> tuple[ledger.JobRow, bool]:
    """Record a job in the ledger, then publish it. Returns the job and whether it is
    new (an idempotency key seen before returns the earlier job, not published again).
    Raises ``ledger.ConversationNotOwned``, or EnqueueFailed (the job is then failed)."""
    job, created = await ledger.admit(pool, request, idempotency_key, webhook_secret)
    if not created:
        return job, False
    try:
        await asyncio.gather(*await publish(settings, producer, [request]))
    except KafkaError as exc:
        log.error("could not publish job %s: %s", request.job_id, exc)
        await ledger.fail(pool, request.job_id, QUEUE_UNAVAILABLE)
        raise EnqueueFailed(str(exc)) from exc
    return job, True
