"""The dashboard's figures from Postgres: throughput, jobs, batches, webhook health,
conversations. Raw asyncpg, a few statements per refresh, never on a hot path.

Every function takes ``tenant``: None reads every tenant (an operator), a tenant
id reads only that tenant's rows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel

from kontext.store import batches
from schemas.batches import BatchView

# A succeeded chat turn is *context-verified* when its prompt carried the
# conversation: nothing of the new message was cut, and the turn just before it
# (if any) was in the prompt as a recent turn.
_RECENT_JOBS = """
    WITH recent AS (
        SELECT j.id, j.conversation_id, j.kind, j.status, j.created_at, j.completed_at,
            coalesce((j.result->'usage'->>'completion_tokens')::bigint, 0) AS tokens,
            j.result->'context' AS ctx
        FROM jobs j
        WHERE j.status IN ('succeeded', 'failed')
            AND j.updated_at >= now() - make_interval(secs => $1)
            AND j.completed_at >= now() - make_interval(secs => $1)
            AND ($2::text IS NULL OR j.tenant_id = $2)
    ), scored AS (
        SELECT r.*, (
            r.status = 'succeeded' AND r.kind = 'chat' AND r.ctx IS NOT NULL
            AND NOT coalesce((r.ctx->>'truncated')::boolean, false)
            AND coalesce((
                SELECT min(t.seq) = 1 OR r.ctx->'turns' @> to_jsonb(min(t.seq) - 1)
                FROM turns t WHERE t.conversation_id = r.conversation_id AND t.job_id = r.id
            ), false)
        ) AS verified
        FROM recent r
    )
"""


class Second(BaseModel):
    """Jobs that ended in one second (unix time ``t``)."""

    t: int
    jobs: int
    failed: int
    tokens: int
    verified: int


class Throughput(BaseModel):
    window_s: int
    now: float
    series: list[Second]
    jobs_per_s: float
    tokens_per_s: float
    verified_per_s: float
    ended: int
    """Jobs that ended within the window."""
    e2e_ms: dict[str, float | None]
    """End-to-end latency (created until completed) of those of them in the interactive
    lane: p50, p95, p99 (a backfill's lines wait their turn by design)."""


class JobCounts(BaseModel):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    tokens: int = 0
    """Completion tokens counted by the recorder (the ``usage`` table)."""


async def throughput(
    pool: asyncpg.Pool, tenant: str | None, window_s: int = 60, rate_s: int = 10
) -> Throughput:
    """Per-second ends over the last ``window_s``; rates are the mean of the last ``rate_s``."""
    async with pool.acquire() as conn:
        now = float(await conn.fetchval("SELECT extract(epoch FROM now())"))
        rows = await conn.fetch(
            _RECENT_JOBS
            + """
            SELECT floor(extract(epoch FROM completed_at))::bigint AS t, count(*) AS jobs,
                count(*) FILTER (WHERE status = 'failed') AS failed,
                sum(tokens) AS tokens, count(*) FILTER (WHERE verified) AS verified
            FROM scored GROUP BY 1 ORDER BY 1
            """,
            float(window_s),
            tenant,
        )
        latency = await conn.fetchrow(
            """
            SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
                ORDER BY extract(epoch FROM completed_at - created_at)) AS q
            FROM jobs j
            WHERE j.status IN ('succeeded', 'failed')
                AND j.updated_at >= now() - make_interval(secs => $1)
                AND j.completed_at >= now() - make_interval(secs => $1)
                AND ($2::text IS NULL OR j.tenant_id = $2)
                AND coalesce(j.request->>'priority', 'interactive') = 'interactive'
            """,
            float(window_s),
            tenant,
        )
    series = [Second(**dict(r)) for r in rows]
    last = [s for s in series if s.t >= now - rate_s]
    quantiles = latency["q"] if latency is not None and latency["q"] is not None else None
    return Throughput(
        window_s=window_s,
        now=now,
        series=series,
        jobs_per_s=sum(s.jobs for s in last) / rate_s,
        tokens_per_s=sum(s.tokens for s in last) / rate_s,
        verified_per_s=sum(s.verified for s in last) / rate_s,
        ended=sum(s.jobs for s in series),
        e2e_ms={
            name: (q * 1000 if quantiles is not None and q is not None else None)
            for name, q in zip(("p50", "p95", "p99"), quantiles or (None,) * 3, strict=True)
        },
    )


async def job_counts(pool: asyncpg.Pool, tenant: str | None) -> JobCounts:
    """Every job by status, and the completion tokens the usage ledger has counted."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """
            SELECT status, count(*) AS n FROM jobs
            WHERE ($1::text IS NULL OR tenant_id = $1) GROUP BY status
            """,
            tenant,
        )
        tokens = await conn.fetchval(
            """
            SELECT coalesce(sum(completion_tokens), 0) FROM usage
            WHERE ($1::text IS NULL OR tenant_id = $1)
            """,
            tenant,
        )
    return JobCounts(**{r["status"]: r["n"] for r in rows}, tokens=tokens)


async def recent_batches(
    pool: asyncpg.Pool, tenant: str | None, limit: int = 10
) -> list[BatchView]:
    """The newest batches, as ``GET /v1/batches/{id}`` shows each."""
    rows = await pool.fetch(
        f"""
        SELECT {batches._COLUMNS} FROM batches
        WHERE ($1::text IS NULL OR tenant_id = $1)
        ORDER BY created_at DESC LIMIT $2
        """,
        tenant,
        limit,
    )
    return [batches._row(r).view() for r in rows]


class Problem(BaseModel):
    """A delivery that is failing or gave up."""

    id: str
    url: str
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None


class WebhookHealth(BaseModel):
    deliveries: dict[str, int]
    """Every delivery by status (pending, delivered, dead)."""
    window_s: int
    attempts: int
    ok: int
    failed: int
    p95_latency_ms: float | None
    problems: list[Problem]


async def webhook_health(
    pool: asyncpg.Pool, tenant: str | None, window_s: int = 300, limit: int = 8
) -> WebhookHealth:
    """Deliveries by status, attempts in the window, and the deliveries in trouble."""
    async with pool.acquire() as conn:
        statuses = await conn.fetch(
            """
            SELECT status, count(*) AS n FROM webhook_deliveries
            WHERE ($1::text IS NULL OR tenant_id = $1) GROUP BY status
            """,
            tenant,
        )
        attempts = await conn.fetchrow(
            """
            SELECT count(*) AS attempts,
                count(*) FILTER (WHERE a.status_code BETWEEN 200 AND 299) AS ok,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY a.latency_ms) AS p95
            FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
            WHERE a.attempted_at >= now() - make_interval(secs => $2)
                AND ($1::text IS NULL OR d.tenant_id = $1)
            """,
            tenant,
            float(window_s),
        )
        problems = await conn.fetch(
            """
            SELECT id::text, url, event_type, status, attempts, last_status_code, last_error,
                next_attempt_at
            FROM webhook_deliveries
            WHERE (status = 'dead' OR (status = 'pending' AND attempts > 0))
                AND ($1::text IS NULL OR tenant_id = $1)
            ORDER BY updated_at DESC LIMIT $2
            """,
            tenant,
            limit,
        )
    assert attempts is not None
    return WebhookHealth(
        deliveries={r["status"]: r["n"] for r in statuses},
        window_s=window_s,
        attempts=attempts["attempts"],
        ok=attempts["ok"],
        failed=attempts["attempts"] - attempts["ok"],
        p95_latency_ms=attempts["p95"],
        problems=[Problem(**dict(r)) for r in problems],
    )


class ConversationItem(BaseModel):
    id: str
    turns: int
    summaries: int
    updated_at: datetime


async def recent_conversations(
    pool: asyncpg.Pool, tenant: str | None, limit: int = 20
) -> list[ConversationItem]:
    """The conversations with the latest activity, with their turn and summary counts
    (not those of batch lines: a backfill would crowd out every other; the viewer opens
    any conversation by id)."""
    rows = await pool.fetch(
        """
        SELECT c.id, c.updated_at,
            (SELECT count(*) FROM turns t WHERE t.conversation_id = c.id) AS turns,
            (SELECT count(*) FROM summaries s WHERE s.conversation_id = c.id) AS summaries
        FROM conversations c
        WHERE ($1::text IS NULL OR c.tenant_id = $1)
            AND NOT EXISTS (
                SELECT 1 FROM jobs j WHERE j.conversation_id = c.id AND j.batch_id IS NOT NULL)
        ORDER BY c.updated_at DESC LIMIT $2
        """,
        tenant,
        limit,
    )
    return [ConversationItem(**dict(r)) for r in rows]


def as_json(value: Any) -> Any:
    """A pydantic model (or list of them) as JSON-ready data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


async def conversation_contexts(
    pool: asyncpg.Pool, conversation_id: str, tenant: str | None
) -> dict[str, Any] | None:
    """The conversation's tenant, and what went into each turn's prompt: ``jobs`` maps a
    job id to its status and ``result.context`` (recent turns, summaries, recalled
    memories). None when the conversation is not there, or belongs to another tenant."""
    async with pool.acquire() as conn:
        owner = await conn.fetchval(
            "SELECT tenant_id FROM conversations WHERE id = $1", conversation_id
        )
        if owner is None or (tenant is not None and owner != tenant):
            return None
        rows = await conn.fetch(
            """
            SELECT id::text, status, result->'context' AS context FROM jobs
            WHERE conversation_id = $1 AND kind = 'chat'
            """,
            conversation_id,
        )
    return {
        "tenant": owner,
        "jobs": {r["id"]: {"status": r["status"], "context": r["context"]} for r in rows},
    }
