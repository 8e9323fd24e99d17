"""Admitting a batch: validate its lines, record them as jobs in chunks, publish them.

Each chunk is one multi-row ledger insert and one pipelined publish (every send
queued, then awaited together). A resubmission with the batch's idempotency key
resumes an intake cut short: lines already admitted are skipped by their job
idempotency key, so none is published twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from kontext import batches
from kontext.settings import Settings
from producers.batch_lines import parse
from producers.submit import EnqueueFailed, SubmissionRejected, check_webhook
from schemas.batches import BatchCreate
from schemas.events import ErrorInfo, JobRequest

log = logging.getLogger(__name__)

WINDOWS_S = {"24h": 24 * 3600.0}


async def _publish(
    settings: Settings,
    pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    batch_id: UUID,
    lines: list[tuple[str, JobRequest]],
) -> int:
    """Admit then publish the lines chunk by chunk; returns how many jobs are new."""
    new = 0
    size = settings.backfill_chunk_size
    for start in range(0, len(lines), size):
        chunk = lines[start : start + size]
        created = await batches.admit(pool, batch_id, chunk)
        try:
            sends = [
                await producer.send(
                    settings.topics.requests_lane(request.priority),
                    request.encode(),
                    key=request.conversation_id.encode(),
                )
                for _, request in chunk
                if request.job_id in created
            ]
            await asyncio.gather(*sends)
        except KafkaError as exc:
            log.error("batch %s: could not publish %d jobs: %s", batch_id, len(created), exc)
            await batches.fail_jobs(
                pool, list(created), ErrorInfo(code="enqueue_failed", message="queue unavailable")
            )
            raise EnqueueFailed(str(exc)) from exc
        new += len(created)
    return new


async def submit_batch(
    settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer, create: BatchCreate
) -> tuple[batches.BatchRow, bool]:
    """Validate, record and publish a batch. Returns it and whether it is new (a known
    idempotency key returns the earlier batch, its intake completed if it was cut short)."""
    began = time.perf_counter()
    parsed = parse(settings, create.input)
    if parsed.total == 0:
        raise SubmissionRejected("empty_input", "the input has no request lines")
    if parsed.total > settings.backfill_max_lines:
        raise SubmissionRejected(
            "too_many_lines",
            f"the input has {parsed.total} lines; the limit is {settings.backfill_max_lines}",
        )
    await check_webhook(settings, create.webhook)
    row, created = await batches.create(
        pool,
        batches.NewBatch(
            endpoint=create.endpoint,
            completion_window=create.completion_window,
            completion_window_s=WINDOWS_S[create.completion_window],
            input_sha256=parsed.sha256,
            total=parsed.total,
            errors=parsed.errors,
            metadata=create.metadata,
            webhook=create.webhook.model_dump() if create.webhook else None,
            idempotency_key=create.idempotency_key,
        ),
    )
    if row.input_sha256 != parsed.sha256:
        raise SubmissionRejected(
            "idempotency_key_reused",
            f"idempotency key already used by batch {row.id} for a different input",
        )
    if row.status != "validating":
        return row, created
    new = await _publish(settings, pool, producer, row.id, parsed.good)
    await batches.start(pool, row.id)
    log.info(
        "batch %s: %d lines, %d bad, %d jobs published in %.2fs",
        row.id,
        parsed.total,
        len(parsed.errors),
        new,
        time.perf_counter() - began,
    )
    current = await batches.get(pool, row.id)
    assert current is not None
    return current, created
