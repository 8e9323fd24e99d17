"""Token usage per tenant, key, model and hour, in Postgres.

``record`` is the usage service's one statement per micro-batch of replies: it
marks each job counted (``jobs.usage_recorded_at``) and adds only the jobs it
marked, so a reply delivered twice is counted once. ``totals`` answers
``GET /v1/usage``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from schemas.tables import NIL_KEY


@dataclass(frozen=True)
class Counted:
    """One final job's usage as its reply reports it (zero tokens when it failed)."""

    job_id: UUID
    prompt_tokens: int
    completion_tokens: int


async def record(conn: asyncpg.Connection | asyncpg.Pool, counted: Sequence[Counted]) -> int:
    """Add these jobs' usage to their tenant's, key's and model's hour, once per job.

    Tenant, key and model come from the ledger, not the reply. Returns how many
    jobs were counted now.
    """
    unique = {c.job_id: c for c in counted}
    if not unique:
        return 0
    value: int = await conn.fetchval(
        f"""
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[])
                AS u(id, prompt_tokens, completion_tokens)
        ), fresh AS (
            UPDATE jobs SET usage_recorded_at = now()
            FROM input
            WHERE jobs.id = input.id AND jobs.usage_recorded_at IS NULL
                AND jobs.status IN ('succeeded', 'failed')
            RETURNING jobs.tenant_id, coalesce(jobs.key_id, '{NIL_KEY}'::uuid) AS key_id,
                jobs.model, date_trunc('hour', coalesce(jobs.completed_at, now())) AS period,
                input.prompt_tokens, input.completion_tokens
        ), added AS (
            INSERT INTO usage AS u (tenant_id, key_id, model, period, requests, prompt_tokens,
                completion_tokens)
            SELECT tenant_id, key_id, model, period, count(*), sum(prompt_tokens),
                sum(completion_tokens)
            FROM fresh
            GROUP BY tenant_id, key_id, model, period
            ORDER BY tenant_id, key_id, model, period
            ON CONFLICT (tenant_id, key_id, model, period) DO UPDATE SET
                requests = u.requests + excluded.requests,
                prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
                completion_tokens = u.completion_tokens + excluded.completion_tokens,
                updated_at = now()
        )
        SELECT count(*) FROM fresh
        """,
        list(unique),
        [c.prompt_tokens for c in unique.values()],
        [c.completion_tokens for c in unique.values()],
    )
    return value


@dataclass(frozen=True)
class UsageRow:
    """Totals for one model or one key (``prefix`` None: work no key submitted)."""

    model: str | None
    key_id: UUID | None
    prefix: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int


async def totals(
    pool: asyncpg.Pool,
    tenant_id: str,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[list[UsageRow], list[UsageRow]]:
    """The tenant's usage per model and per key over hours in ``[since, until)``."""
    rows = await pool.fetch(
        """
        SELECT GROUPING(u.model) = 0 AS by_model, u.model, u.key_id, k.prefix,
            sum(u.requests)::bigint AS requests,
            sum(u.prompt_tokens)::bigint AS prompt_tokens,
            sum(u.completion_tokens)::bigint AS completion_tokens
        FROM usage u LEFT JOIN api_keys k ON k.id = u.key_id
        WHERE u.tenant_id = $1
            AND ($2::timestamptz IS NULL OR u.period >= date_trunc('hour', $2::timestamptz))
            AND ($3::timestamptz IS NULL OR u.period < $3::timestamptz)
        GROUP BY GROUPING SETS ((u.model), (u.key_id, k.prefix))
        ORDER BY 2, 4
        """,
        tenant_id,
        since,
        until,
    )
    models: list[UsageRow] = []
    keys: list[UsageRow] = []
    for row in rows:
        item = UsageRow(
            model=row["model"] if row["by_model"] else None,
            key_id=None if row["by_model"] or str(row["key_id"]) == NIL_KEY else row["key_id"],
            prefix=None if row["by_model"] else row["prefix"],
            requests=row["requests"],
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
        )
        (models if row["by_model"] else keys).append(item)
    return models, keys
