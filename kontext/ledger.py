"""The jobs ledger in Postgres: SQL for admitting, claiming and finalising jobs.

Raw asyncpg, one statement per micro-batch on the hot paths. Postgres is the
system of record; every write here is idempotent by job id, so at-least-once
delivery from Kafka never answers a job twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from schemas.api import JobStatus
from schemas.events import ChatCompletion, ErrorInfo, JobCompletion, JobRequest, Role


@dataclass(frozen=True)
class JobRow:
    id: UUID
    conversation_id: str
    model: str
    status: JobStatus
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: datetime
    completed_at: datetime | None


_JOB_COLUMNS = "id, conversation_id, model, status, result, error, created_at, completed_at"


def _row(record: asyncpg.Record) -> JobRow:
    return JobRow(**dict(record))


async def admit(
    pool: asyncpg.Pool, request: JobRequest, idempotency_key: str | None
) -> tuple[JobRow, bool]:
    """Record a new queued job; with a known idempotency key, return that job instead.

    Returns the job and whether it was created now.
    """
    async with pool.acquire() as conn:
        created = await conn.fetchrow(
            f"""
            INSERT INTO jobs (id, conversation_id, model, status, request, idempotency_key)
            VALUES ($1, $2, $3, 'queued', $4, $5)
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING {_JOB_COLUMNS}
            """,
            request.job_id,
            request.conversation_id,
            request.model,
            request.model_dump(mode="json"),
            idempotency_key,
        )
        if created is not None:
            return _row(created), True
        # The key is taken: a statement after the insert sees the committed winner.
        existing = await conn.fetchrow(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE idempotency_key = $1", idempotency_key
        )
    if existing is None:  # pragma: no cover - a key is never deleted
        raise RuntimeError("idempotency key conflict without a job")
    return _row(existing), False


async def get(pool: asyncpg.Pool, job_id: UUID) -> JobRow | None:
    row = await pool.fetchrow(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
    return _row(row) if row is not None else None


async def fail(pool: asyncpg.Pool, job_id: UUID, error: ErrorInfo) -> None:
    """Finalise a job that never reached the pipeline (it could not be enqueued)."""
    await pool.execute(
        """
        UPDATE jobs SET status = 'failed', error = $2, completed_at = now(), updated_at = now()
        WHERE id = $1 AND status NOT IN ('succeeded', 'failed')
        """,
        job_id,
        error.model_dump(mode="json"),
    )


@dataclass(frozen=True)
class StoredTurn:
    seq: int
    role: Role
    content: str
    tokens: int


async def claim_with_history(
    conn: asyncpg.Connection, job_ids: Sequence[UUID], max_turns: int
) -> dict[UUID, list[StoredTurn]]:
    """Mark jobs running and fetch each one's recent turns, in one round trip.

    Jobs already final (a redelivered message) are left out of the answer.
    Turns come oldest first.
    """
    rows = await conn.fetch(
        """
        WITH claimed AS (
            UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = now()
            WHERE id = ANY($1::uuid[]) AND status IN ('queued', 'running')
            RETURNING id, conversation_id
        )
        SELECT claimed.id AS job_id, t.seq, t.role, t.content, t.tokens
        FROM claimed
        LEFT JOIN LATERAL (
            SELECT seq, role, content, tokens FROM turns
            WHERE turns.conversation_id = claimed.conversation_id
            ORDER BY seq DESC LIMIT $2
        ) t ON true
        """,
        list(job_ids),
        max_turns,
    )
    history: dict[UUID, list[StoredTurn]] = {}
    for row in rows:
        turns = history.setdefault(row["job_id"], [])
        if row["seq"] is not None:
            turns.append(StoredTurn(row["seq"], row["role"], row["content"], row["tokens"]))
    for turns in history.values():
        turns.sort(key=lambda t: t.seq)
    return history


@dataclass(frozen=True)
class Outcome:
    """A job's final state after recording: ``fresh`` when this batch finalised it."""

    job_id: UUID
    conversation_id: str
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    fresh: bool


async def record(conn: asyncpg.Connection, completions: Sequence[JobCompletion]) -> list[Outcome]:
    """Finalise jobs and store their turns in one statement.

    Only jobs not yet final are updated and get turns; a duplicate completion
    leaves the ledger as it was and comes back with the stored result.
    """
    ids: list[UUID] = []
    statuses: list[str] = []
    results: list[dict[str, Any] | None] = []
    errors: list[dict[str, Any] | None] = []
    turn_jobs: list[UUID] = []
    turn_roles: list[str] = []
    turn_contents: list[str] = []
    turn_tokens: list[int] = []
    turn_order: list[int] = []
    seen: set[UUID] = set()
    for done in completions:
        if done.job_id in seen:
            continue  # the same job twice in one batch: the first answer wins
        seen.add(done.job_id)
        ids.append(done.job_id)
        statuses.append(done.status)
        results.append(
            ChatCompletion.from_completion(done).model_dump(mode="json")
            if done.status == "succeeded"
            else None
        )
        errors.append(done.error.model_dump(mode="json") if done.error else None)
        if done.status == "succeeded":
            for turn in done.new_turns:
                turn_jobs.append(done.job_id)
                turn_roles.append(turn.role)
                turn_contents.append(turn.content)
                turn_tokens.append(turn.tokens)
                turn_order.append(len(turn_order))
    rows = await conn.fetch(
        """
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[])
                AS u(id, status, result, error)
        ), fresh AS (
            UPDATE jobs SET status = input.status, result = input.result, error = input.error,
                completed_at = now(), updated_at = now()
            FROM input
            WHERE jobs.id = input.id AND jobs.status NOT IN ('succeeded', 'failed')
            RETURNING jobs.id, jobs.conversation_id, jobs.status, jobs.result, jobs.error
        ), conv AS (
            INSERT INTO conversations (id)
            SELECT DISTINCT conversation_id FROM fresh WHERE status = 'succeeded'
            ON CONFLICT (id) DO UPDATE SET updated_at = now()
        ), new_turns AS (
            SELECT t.*, fresh.conversation_id
            FROM unnest($5::uuid[], $6::text[], $7::text[], $8::int[], $9::int[])
                AS t(job_id, role, content, tokens, ord)
            JOIN fresh ON fresh.id = t.job_id
        ), stored AS (
            INSERT INTO turns (conversation_id, seq, role, content, tokens, job_id)
            SELECT conversation_id,
                coalesce((SELECT max(seq) FROM turns x
                          WHERE x.conversation_id = new_turns.conversation_id), 0)
                + row_number() OVER (PARTITION BY conversation_id ORDER BY ord),
                role, content, tokens, job_id
            FROM new_turns
        )
        SELECT j.id, j.conversation_id, fresh.id IS NOT NULL AS fresh,
            coalesce(fresh.status, j.status) AS status,
            CASE WHEN fresh.id IS NULL THEN j.result ELSE fresh.result END AS result,
            CASE WHEN fresh.id IS NULL THEN j.error ELSE fresh.error END AS error
        FROM jobs j LEFT JOIN fresh ON fresh.id = j.id
        WHERE j.id = ANY($1::uuid[])
        """,
        ids,
        statuses,
        results,
        errors,
        turn_jobs,
        turn_roles,
        turn_contents,
        turn_tokens,
        turn_order,
    )
    return [
        Outcome(
            job_id=row["id"],
            conversation_id=row["conversation_id"],
            status=row["status"],
            result=row["result"],
            error=row["error"],
            fresh=row["fresh"],
        )
        for row in rows
    ]
