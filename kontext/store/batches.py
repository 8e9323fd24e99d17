"""Batch backfills in Postgres: create, admit lines as jobs, count, close, cancel, expire.

Raw asyncpg. A batch's jobs are ordinary jobs carrying ``batch_id`` and
``custom_id``; its counts are an aggregate over them (one statement for any
number of batches), so a reply seen twice never counts twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from schemas.batches import (
    BatchError,
    BatchErrors,
    BatchStatus,
    BatchView,
    LineError,
    RequestCounts,
)
from schemas.events import ErrorInfo, JobRequest
from schemas.files import file_id

_COLUMNS = """id, status, endpoint, completion_window, input_sha256, metadata, webhook, total,
    completed, failed, errors, created_at, expires_at, in_progress_at, finalizing_at,
    completed_at, failed_at, expired_at, cancelling_at, cancelled_at, input_file_id,
    output_file_id, error_file_id, tenant_id"""

CANCELLED = ErrorInfo(code="batch_cancelled", message="the batch was cancelled")
EXPIRED = ErrorInfo(code="batch_expired", message="the batch expired before this request ran")


@dataclass(frozen=True)
class BatchRow:
    id: UUID
    status: BatchStatus
    endpoint: str
    completion_window: str
    input_sha256: str
    metadata: dict[str, Any]
    webhook: dict[str, Any] | None
    total: int
    completed: int
    failed: int
    errors: list[dict[str, Any]]
    created_at: datetime
    expires_at: datetime
    in_progress_at: datetime | None
    finalizing_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    expired_at: datetime | None
    cancelling_at: datetime | None
    cancelled_at: datetime | None
    input_file_id: UUID | None = None
    output_file_id: UUID | None = None
    error_file_id: UUID | None = None
    tenant_id: str = "default"

    @property
    def bad_lines(self) -> list[LineError]:
        return [LineError.model_validate(e) for e in self.errors]

    def view(self) -> BatchView:
        """The batch as the API shows it, an OpenAI Batch object (never its webhook
        secret); bad input lines count as failed requests."""
        bad = [BatchError(code=e.code, message=e.message, line=e.line) for e in self.bad_lines]
        return BatchView(
            id=str(self.id),
            endpoint=self.endpoint,
            input_file_id=_file(self.input_file_id),
            status=self.status,
            completion_window=self.completion_window,
            output_file_id=_file(self.output_file_id),
            error_file_id=_file(self.error_file_id),
            errors=BatchErrors(data=bad) if bad else None,
            request_counts=RequestCounts(
                total=self.total,
                completed=self.completed,
                failed=self.failed + len(self.errors),
            ),
            metadata=self.metadata,
            created_at=int(self.created_at.timestamp()),
            expires_at=int(self.expires_at.timestamp()),
            in_progress_at=_unix(self.in_progress_at),
            finalizing_at=_unix(self.finalizing_at),
            completed_at=_unix(self.completed_at),
            failed_at=_unix(self.failed_at),
            expired_at=_unix(self.expired_at) if self.status == "expired" else None,
            cancelling_at=_unix(self.cancelling_at),
            cancelled_at=_unix(self.cancelled_at),
        )


def _unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def _file(uuid: UUID | None) -> str | None:
    return file_id(uuid) if uuid is not None else None


def _row(record: asyncpg.Record) -> BatchRow:
    return BatchRow(**dict(record))


@dataclass(frozen=True)
class NewBatch:
    endpoint: str
    completion_window_s: float
    completion_window: str
    input_sha256: str
    total: int
    errors: list[LineError]
    metadata: dict[str, Any]
    webhook: dict[str, Any] | None
    idempotency_key: str | None
    tenant_id: str = "default"
    key_id: UUID | None = None
    input_file_id: UUID | None = None


async def create(pool: asyncpg.Pool, new: NewBatch) -> tuple[BatchRow, bool]:
    """Record a batch in ``validating``; with a known idempotency key, return that batch.

    Returns the batch and whether it was created now.
    """
    async with pool.acquire() as conn:
        created = await conn.fetchrow(
            f"""
            INSERT INTO batches (id, status, endpoint, completion_window, idempotency_key,
                input_sha256, metadata, webhook, total, errors, expires_at, tenant_id, key_id,
                input_file_id)
            VALUES ($1, 'validating', $2, $3, $4, $5, $6, $7, $8, $9,
                now() + make_interval(secs => $10), $11, $12, $13)
            ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
            RETURNING {_COLUMNS}
            """,
            uuid4(),
            new.endpoint,
            new.completion_window,
            new.idempotency_key,
            new.input_sha256,
            new.metadata,
            new.webhook,
            new.total,
            [e.model_dump(exclude_none=True) for e in new.errors],
            new.completion_window_s,
            new.tenant_id,
            new.key_id,
            new.input_file_id,
        )
        if created is not None:
            return _row(created), True
        existing = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM batches WHERE tenant_id = $1 AND idempotency_key = $2",
            new.tenant_id,
            new.idempotency_key,
        )
    if existing is None:  # pragma: no cover - a key is never deleted
        raise RuntimeError("batch idempotency key conflict without a batch")
    return _row(existing), False


async def get(
    pool: asyncpg.Pool | asyncpg.Connection, batch_id: UUID, tenant_id: str | None = None
) -> BatchRow | None:
    """The batch, or None; with ``tenant_id``, only a batch of that tenant."""
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM batches WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)",
        batch_id,
        tenant_id,
    )
    return _row(row) if row is not None else None


async def page(
    pool: asyncpg.Pool, tenant_id: str, *, limit: int = 20, after: UUID | None = None
) -> tuple[list[BatchRow], bool]:
    """The tenant's batches, newest first, past the batch ``after`` when given; at most
    ``limit`` of them and whether more follow."""
    rows = await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM batches
        WHERE tenant_id = $1 AND ($2::uuid IS NULL OR (created_at, id) <
            (SELECT created_at, id FROM batches WHERE id = $2 AND tenant_id = $1))
        ORDER BY created_at DESC, id DESC
        LIMIT $3
        """,
        tenant_id,
        after,
        limit + 1,
    )
    return [_row(r) for r in rows[:limit]], len(rows) > limit


async def admit(
    pool: asyncpg.Pool, batch_id: UUID, lines: Sequence[tuple[str, JobRequest]]
) -> set[UUID]:
    """Record ``(custom_id, request)`` lines as queued jobs of a validating batch, in one
    multi-row insert. A line admitted before (key ``batch:{id}:{custom_id}``) is skipped.

    The jobs are the batch's tenant's. A line naming a conversation another tenant
    owns (validation refuses those; this covers one taken since) is recorded as
    failed (``conversation_not_found``) and not published.

    Returns the ids of the jobs created now: only those are to be published.
    """
    rows = await pool.fetch(
        """
        WITH batch AS (
            SELECT tenant_id, key_id FROM batches WHERE id = $1 AND status = 'validating'
        ), input AS (
            SELECT u.*, batch.tenant_id, batch.key_id
            FROM unnest($2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::text[], $7::text[])
                AS u(id, conversation_id, model, request, custom_id, user_id)
            CROSS JOIN batch
        ), conversation AS (
            INSERT INTO conversations (id, user_id, tenant_id)
            SELECT DISTINCT ON (conversation_id) conversation_id, user_id, tenant_id FROM input
            ON CONFLICT (id) DO NOTHING
            RETURNING id
        ), owned AS (
            SELECT id FROM conversation
            UNION
            SELECT c.id FROM conversations c JOIN batch ON c.tenant_id = batch.tenant_id
            WHERE c.id IN (SELECT conversation_id FROM input)
        )
        INSERT INTO jobs (id, conversation_id, model, kind, status, request, idempotency_key,
            batch_id, custom_id, tenant_id, key_id, error, completed_at)
        SELECT i.id, i.conversation_id, i.model, 'chat',
            CASE WHEN o.id IS NULL THEN 'failed' ELSE 'queued' END, i.request,
            'batch:' || $1::text || ':' || i.custom_id, $1, i.custom_id, i.tenant_id, i.key_id,
            CASE WHEN o.id IS NULL THEN jsonb_build_object(
                'code', 'conversation_not_found',
                'message', 'no conversation ' || i.conversation_id) END,
            CASE WHEN o.id IS NULL THEN now() END
        FROM input i LEFT JOIN owned o ON o.id = i.conversation_id
        ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
        RETURNING id, status
        """,
        batch_id,
        [r.job_id for _, r in lines],
        [r.conversation_id for _, r in lines],
        [r.model for _, r in lines],
        [r.model_dump(mode="json") for _, r in lines],
        [custom_id for custom_id, _ in lines],
        [r.user for _, r in lines],
    )
    return {row["id"] for row in rows if row["status"] == "queued"}


async def fail_jobs(pool: asyncpg.Pool, job_ids: Sequence[UUID], error: ErrorInfo) -> None:
    """Finalise jobs that never reached the pipeline (they could not be published)."""
    await pool.execute(
        """
        UPDATE jobs SET status = 'failed', error = $2, completed_at = now(), updated_at = now()
        WHERE id = ANY($1::uuid[]) AND status NOT IN ('succeeded', 'failed')
        """,
        list(job_ids),
        error.model_dump(mode="json"),
    )


async def start(pool: asyncpg.Pool | asyncpg.Connection, batch_id: UUID) -> None:
    """Every good line is a published job: ``in_progress``, or ``failed`` when none was good."""
    await pool.execute(
        """
        UPDATE batches SET updated_at = now(),
            status = CASE WHEN jobs.n > 0 THEN 'in_progress' ELSE 'failed' END,
            in_progress_at = CASE WHEN jobs.n > 0 THEN now() END,
            failed_at = CASE WHEN jobs.n = 0 THEN now() END
        FROM (SELECT count(*) AS n FROM jobs WHERE batch_id = $1) jobs
        WHERE id = $1 AND status = 'validating'
        """,
        batch_id,
    )


async def cancel(pool: asyncpg.Pool, batch_id: UUID, tenant_id: str) -> BatchRow | None:
    """Move the tenant's open batch to ``cancelling`` and fail its jobs still queued
    (the budget they held is released as they turn final); returns the batch (None if
    the tenant has none of that id).

    Jobs past the enricher fail as they reach the inference worker (its stopped-batches
    step); those the engine runs finish. The batches service then moves the batch to
    ``cancelled``.
    """
    async with pool.acquire() as conn, conn.transaction():
        moved = await conn.fetchval(
            """
            UPDATE batches SET status = 'cancelling', cancelling_at = now(), updated_at = now()
            WHERE id = $1 AND tenant_id = $2 AND status IN ('validating', 'in_progress')
            RETURNING id
            """,
            batch_id,
            tenant_id,
        )
        if moved is not None:
            await _fail_queued(conn, [batch_id], CANCELLED)
        return await get(conn, batch_id, tenant_id)


async def _fail_queued(conn: asyncpg.Connection, batch_ids: list[UUID], error: ErrorInfo) -> None:
    await conn.execute(
        """
        UPDATE jobs SET status = 'failed', error = $2, completed_at = now(), updated_at = now()
        WHERE batch_id = ANY($1::uuid[]) AND status = 'queued'
        """,
        batch_ids,
        error.model_dump(mode="json"),
    )


async def stopped(pool: asyncpg.Pool, batch_ids: Sequence[UUID]) -> dict[UUID, ErrorInfo]:
    """Of ``batch_ids``, those cancelled (or cancelling) or expired (or expiring), with the
    error their lines not yet run end with."""
    rows = await pool.fetch(
        """
        SELECT id, status IN ('cancelling', 'cancelled') AS cancelled FROM batches
        WHERE id = ANY($1::uuid[])
            AND (status IN ('cancelling', 'cancelled', 'expired') OR expired_at IS NOT NULL)
        """,
        list(batch_ids),
    )
    return {row["id"]: CANCELLED if row["cancelled"] else EXPIRED for row in rows}


async def refresh(
    conn: asyncpg.Connection,
    *,
    job_ids: Sequence[UUID] | None = None,
    batch_ids: Sequence[UUID] = (),
) -> list[UUID]:
    """Recount open batches from their jobs, in one statement: those of ``job_ids``, or
    every open batch when None, plus ``batch_ids`` whatever their status.

    A batch with no job left to run (none queued, running or held for review) moves on:
    ``cancelling`` to ``cancelled``, an expiring one to ``expired``, ``in_progress`` to
    ``finalizing``. Returns the ids of the batches now finalizing.
    """
    rows = await conn.fetch(
        """
        WITH touched AS (
            SELECT id FROM batches
            WHERE (status IN ('in_progress', 'cancelling')
                    OR status = 'validating' AND expired_at IS NOT NULL)
                AND ($1::uuid[] IS NULL
                    OR id IN (SELECT batch_id FROM jobs WHERE id = ANY($1::uuid[])))
            UNION
            SELECT unnest($2::uuid[])
        ), counts AS (
            SELECT t.id,
                count(*) FILTER (WHERE j.status = 'succeeded') AS completed,
                count(*) FILTER (WHERE j.status = 'failed') AS failed,
                count(*) FILTER (WHERE j.status IN ('queued', 'running', 'needs_review')) AS open
            FROM touched t LEFT JOIN jobs j ON j.batch_id = t.id
            GROUP BY t.id
        ), moved AS (
            SELECT b.id,
                CASE WHEN c.open > 0 OR b.status NOT IN ('validating', 'in_progress', 'cancelling')
                        THEN b.status
                     WHEN b.status = 'cancelling' THEN 'cancelled'
                     WHEN b.expired_at IS NOT NULL THEN 'expired'
                     WHEN b.status = 'in_progress' THEN 'finalizing'
                     ELSE b.status END AS status
            FROM batches b JOIN counts c ON c.id = b.id
        )
        UPDATE batches b SET completed = c.completed, failed = c.failed, updated_at = now(),
            status = m.status,
            finalizing_at = CASE WHEN m.status = 'finalizing' AND b.status <> 'finalizing'
                                 THEN now() ELSE b.finalizing_at END,
            cancelled_at = CASE WHEN m.status = 'cancelled' AND b.status <> 'cancelled'
                                THEN now() ELSE b.cancelled_at END,
            expired_at = CASE WHEN m.status = 'expired' AND b.status <> 'expired'
                              THEN now() ELSE b.expired_at END
        FROM counts c JOIN moved m ON m.id = c.id
        WHERE b.id = c.id
        RETURNING b.id, b.status
        """,
        None if job_ids is None else list(job_ids),
        list(batch_ids),
    )
    return [row["id"] for row in rows if row["status"] == "finalizing"]


async def complete(conn: asyncpg.Connection, batch_ids: Sequence[UUID] | None = None) -> None:
    """Close finalizing batches (these, or all when None) as ``completed``."""
    await conn.execute(
        """
        UPDATE batches SET status = 'completed', completed_at = now(), updated_at = now()
        WHERE status = 'finalizing' AND ($1::uuid[] IS NULL OR id = ANY($1::uuid[]))
        """,
        None if batch_ids is None else list(batch_ids),
    )


async def expire(conn: asyncpg.Connection) -> list[UUID]:
    """Start expiring open batches past ``expires_at``: fail their jobs not yet started
    and mark them (``expired_at``), so that their lines past the enricher fail before
    the engine; returns those batches. Each becomes ``expired``, with its files, once
    no job of it is left to run (``refresh``): the lines already running finish, and
    every line ends in the output or the error file."""
    rows = await conn.fetch(
        """
        UPDATE batches SET expired_at = now(), updated_at = now()
        WHERE status IN ('validating', 'in_progress') AND expires_at <= now()
            AND expired_at IS NULL
        RETURNING id
        """
    )
    expired = [row["id"] for row in rows]
    if expired:
        await _fail_queued(conn, expired, EXPIRED)
    return expired


async def unnotified(conn: asyncpg.Connection, limit: int = 100) -> list[BatchRow]:
    """Ended batches whose end event is not queued yet (for their webhook or their
    tenant's endpoints), locked until the transaction ends."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM batches
        WHERE notified_at IS NULL
            AND status IN ('completed', 'failed', 'expired', 'cancelled')
        LIMIT $1
        FOR UPDATE SKIP LOCKED
        """,
        limit,
    )
    return [_row(row) for row in rows]


async def set_files(
    conn: asyncpg.Connection, batch_id: UUID, output: UUID | None, error: UUID | None
) -> None:
    """Record an ended batch's output and error files."""
    await conn.execute(
        "UPDATE batches SET output_file_id = $2, error_file_id = $3 WHERE id = $1",
        batch_id,
        output,
        error,
    )


async def mark_notified(conn: asyncpg.Connection, batch_ids: Sequence[UUID]) -> None:
    await conn.execute(
        "UPDATE batches SET notified_at = now() WHERE id = ANY($1::uuid[])", list(batch_ids)
    )


@dataclass(frozen=True)
class JobLine:
    """A batch job as its output or error line needs it."""

    job_id: UUID
    custom_id: str
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None


async def job_lines(
    conn: asyncpg.Connection, batch_id: UUID, *, succeeded: bool, chunk: int = 500
) -> AsyncIterator[list[JobLine]]:
    """The batch's succeeded jobs (or its failed ones), ``chunk`` at a time, by custom_id
    (``conn`` must be in a transaction)."""
    cursor = conn.cursor(
        """
        SELECT id, custom_id, status, result, error FROM jobs
        WHERE batch_id = $1 AND status = $2
        ORDER BY custom_id
        """,
        batch_id,
        "succeeded" if succeeded else "failed",
        prefetch=chunk,
    )
    lines: list[JobLine] = []
    async for row in cursor:
        lines.append(
            JobLine(row["id"], row["custom_id"], row["status"], row["result"], row["error"])
        )
        if len(lines) == chunk:
            yield lines
            lines = []
    if lines:
        yield lines
