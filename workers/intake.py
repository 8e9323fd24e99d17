"""The one way a job's request enters the pipeline.

API submissions, batch lines, summaries, the recorder's held turns and the
reconciler's re-drives all publish through ``publish``: it alone chooses the
topic (the request's lane) and the key. It takes ``JobRequest`` models, whose
webhook has no place for a secret, so no request on any topic ever carries one.
``enqueue`` records a new job in the ledger first (the secret goes to its own
column there), then publishes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from kontext import tracing
from kontext.settings import Settings
from kontext.store import ledger
from schemas.events import ErrorInfo, JobRequest

log = logging.getLogger(__name__)

QUEUE_UNAVAILABLE = ErrorInfo(code="enqueue_failed", message="the queue is unavailable")


class EnqueueFailed(Exception):
    """The job was recorded but could not be published; it is marked failed."""


async def publish(
    settings: Settings, producer: AIOKafkaProducer, requests: Sequence[JobRequest]
) -> list[asyncio.Future[object]]:
    """Queue the sends that put ``requests`` into the pipeline: each to its lane's
    requests topic, keyed by conversation (its turns stay in order on one partition),
    with the current trace context (the intake's span) when tracing is on. Await the
    futures for delivery."""
    topics = settings.topics
    headers: tracing.Headers | None = None
    if tracing.enabled():
        headers = []
        tracing.inject(headers)
    return [
        await producer.send(
            topics.requests_lane(request.priority),
            request.encode(),
            key=request.conversation_id.encode(),
            headers=headers or None,
        )
        for request in requests
    ]


async def enqueue(
    settings: Settings,
    admitter: ledger.Admitter,
    producer: AIOKafkaProducer,
    request: JobRequest,
    idempotency_key: str | None,
    webhook_secret: str | None = None,
) -> tuple[ledger.JobRow, bool]:
    """Record a job in the ledger (with the other jobs being recorded: one statement),
    then publish it. Returns the job and whether it is new (an idempotency key seen
    before returns the earlier job, not published again). Raises
    ``ledger.ConversationNotOwned``, or EnqueueFailed (the job is then failed, and its
    idempotency key free for a retry)."""
    job, created = await admitter.admit(request, idempotency_key, webhook_secret)
    if not created:
        return job, False
    try:
        await asyncio.gather(*await publish(settings, producer, [request]))
    except KafkaError as exc:
        log.error("could not publish job %s: %s", request.job_id, exc)
        await ledger.fail(admitter.pool, request.job_id, QUEUE_UNAVAILABLE, free_key=True)
        raise EnqueueFailed(str(exc)) from exc
    return job, True
