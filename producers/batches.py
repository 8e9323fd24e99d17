"""Admitting a batch: validate its lines, record them as jobs in chunks, publish them.

Each chunk is one multi-row ledger insert and one pipelined publish (every send
queued, then awaited together) to the background requests topic; the enricher
decides each line against its tenant's limits. A resubmission with the batch's
idempotency key resumes an intake cut short: lines already admitted are skipped by
their job idempotency key, so none is published twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from uuid import UUID

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from kontext.settings import Settings
from kontext.store import batches
from producers.batch_lines import ParsedInput, parse
from producers.submit import SubmissionRejected, check_webhook
from schemas.batches import BatchCreate, LineError, jsonl_lines
from schemas.events import ErrorInfo, JobRequest
from workers import batch_files
from workers.intake import EnqueueFailed, publish
from workers.policies.chain import PolicyChain

log = logging.getLogger(__name__)

WINDOWS_S = {"24h": 24 * 3600.0}


async def _publish(
    settings: Settings,
    pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    batch_id: UUID,
    lines: list[tuple[str, JobRequest]],
) -> int:
    """Admit then publish the lines chunk by chunk, each request naming the batch;
    returns how many jobs are new."""
    new = 0
    size = settings.backfill_chunk_size
    for start in range(0, len(lines), size):
        chunk = [
            (custom_id, request.model_copy(update={"batch_id": batch_id}))
            for custom_id, request in lines[start : start + size]
        ]
        created = await batches.admit(pool, batch_id, chunk)
        try:
            fresh = [request for _, request in chunk if request.job_id in created]
            await asyncio.gather(*await publish(settings, producer, fresh))
        except KafkaError as exc:
            log.error("batch %s: could not publish %d jobs: %s", batch_id, len(created), exc)
            await batches.fail_jobs(
                pool, list(created), ErrorInfo(code="enqueue_failed", message="queue unavailable")
            )
            raise EnqueueFailed(str(exc)) from exc
        new += len(created)
    return new


async def refuse_foreign_conversations(
    pool: asyncpg.Pool, tenant_id: str, parsed: ParsedInput, text: str
) -> None:
    """Move the lines naming another tenant's conversation to the bad lines
    (``conversation_not_found``, like a conversation that does not exist); one query."""
    named = list({request.conversation_id for _, request in parsed.good})
    rows = await pool.fetch(
        "SELECT id FROM conversations WHERE id = ANY($1::text[]) AND tenant_id <> $2",
        named,
        tenant_id,
    )
    foreign = {row["id"] for row in rows}
    if not foreign:
        return
    refused = {c: r.conversation_id for c, r in parsed.good if r.conversation_id in foreign}
    parsed.good = [(c, r) for c, r in parsed.good if c not in refused]
    bad = {error.line for error in parsed.errors}
    for number, raw in enumerate(jsonl_lines(text), 1):  # their line numbers (rare path)
        if number in bad:
            continue
        try:
            line = orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError:
            continue
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        if isinstance(custom_id, str) and custom_id in refused:
            parsed.errors.append(
                LineError(
                    code="conversation_not_found",
                    message=f"no conversation {refused.pop(custom_id)}; "
                    "choose another conversation_id",
                    line=number,
                    custom_id=custom_id,
                )
            )
    parsed.errors.sort(key=lambda error: error.line)


async def submit_batch(
    settings: Settings,
    pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    create: BatchCreate,
    text: str,
    *,
    input_file_id: UUID | None = None,
    tenant_id: str = "default",
    key_id: UUID | None = None,
    chain: PolicyChain | None = None,
) -> tuple[batches.BatchRow, bool]:
    """Validate, record and publish a tenant's batch whose input file holds ``text``.
    Returns it and whether it is new (a known idempotency key of the tenant returns the
    earlier batch, its intake completed if it was cut short)."""
    began = time.perf_counter()
    parsed = parse(settings, text)
    await refuse_foreign_conversations(pool, tenant_id, parsed, text)
    owner = {"tenant_id": tenant_id, "key_id": key_id}
    intake = chain.rewrite_request if chain is not None else (lambda request: request)
    good = [
        (custom_id, intake(request.model_copy(update=owner))) for custom_id, request in parsed.good
    ]
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
            metadata=create.metadata or {},
            webhook=create.webhook.model_dump() if create.webhook else None,
            idempotency_key=create.idempotency_key,
            tenant_id=tenant_id,
            key_id=key_id,
            input_file_id=input_file_id,
        ),
    )
    if row.input_sha256 != parsed.sha256:
        raise SubmissionRejected(
            "idempotency_key_reused",
            f"idempotency key already used by batch {row.id} for a different input",
        )
    if row.status != "validating":
        return row, created
    new = await _publish(settings, pool, producer, row.id, good)
    async with pool.acquire() as conn, conn.transaction():
        await batches.start(conn, row.id)
        started = await batches.get(conn, row.id)
        if started is not None and started.status == "failed":  # every line was bad
            await batch_files.write(conn, started)
    log.info(
        "batch %s: %d lines, %d bad, %d jobs published in %.2fs",
        row.id,
        parsed.total,
        len(parsed.errors),
        new,
        time.perf_counter() - began,
    )
    current = await batches.get(pool, row.id, tenant_id)
    assert current is not None
    return current, created
