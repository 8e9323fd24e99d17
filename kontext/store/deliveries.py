"""Webhook deliveries in Postgres: create, claim, record attempts, list, redeliver.

Raw asyncpg, one statement per micro-batch on the hot paths. A delivery is
unique per job (or per batch, for its end event), so a redelivered reply never
creates a second one. An attempt
in flight holds a lease (``leased_until``); a dispatcher that dies mid-attempt
loses it, and the delivery is claimed again once the lease runs out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any
from uuid import UUID

import asyncpg

from schemas.webhooks import DeliveryStatus, DeliveryView

_CLAIMED = "id, job_id, url, secret, payload, attempts, cycle_attempts, traceparent"
SUBSCRIBED = (
    "({type} = ANY(w.events) OR split_part({type}, '.', 1) || '.*' = ANY(w.events)"
    " OR '*' = ANY(w.events))"
)
"""An endpoint subscribed to an event type: by its name, its family (``job.*``) or ``*``."""
CHANNEL = "kontext_deliveries"
"""NOTIFY channel: deliveries were created (the dispatcher claims the due ones)."""


@dataclass(frozen=True)
class Delivery:
    """A delivery claimed for one attempt (numbered ``attempt`` overall)."""

    id: UUID
    job_id: UUID | None
    url: str
    secret: str | None = field(repr=False)
    payload: dict[str, Any] = field(repr=False)
    attempt: int
    cycle_attempt: int
    traceparent: str | None = None
    """Its job's ``record`` span, when the job was traced: each attempt is a span under it."""


def _claimed(record: asyncpg.Record) -> Delivery:
    return Delivery(
        id=record["id"],
        job_id=record["job_id"],
        url=record["url"],
        secret=record["secret"],
        payload=record["payload"],
        attempt=record["attempts"],
        cycle_attempt=record["cycle_attempts"],
        traceparent=record["traceparent"],
    )


@dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt; ``retry_in_s`` None after a failure means dead."""

    delivery_id: UUID
    attempt: int
    attempted_at: datetime
    latency_ms: int
    status_code: int | None
    error: str | None
    retry_in_s: float | None


@dataclass(frozen=True)
class BatchEvent:
    """A batch's end event, to deliver to the batch's webhook."""

    batch_id: UUID
    type: str
    url: str | None
    """The batch's own webhook, if it has one."""
    secret: str | None = field(repr=False)
    payload: dict[str, Any] = field(repr=False)


async def create_for_batches(
    conn: asyncpg.Connection, events: Sequence[BatchEvent], first_delay_s: float
) -> None:
    """Create each batch's end-event deliveries (once each), for the scheduler to attempt
    when due: to its own webhook and to each endpoint of its tenant subscribed to it."""
    await conn.execute(
        f"""
        INSERT INTO webhook_deliveries (id, batch_id, endpoint_id, event_type, url, secret,
            payload, next_attempt_at, tenant_id)
        SELECT gen_random_uuid(), e.batch_id, t.endpoint_id, e.type, t.url, t.secret,
            e.payload, now() + make_interval(secs => $6), b.tenant_id
        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
            AS e(batch_id, type, url, secret, payload)
        JOIN batches b ON b.id = e.batch_id
        CROSS JOIN LATERAL (
            SELECT NULL::uuid AS endpoint_id, e.url, e.secret WHERE e.url IS NOT NULL
            UNION ALL
            SELECT w.id, w.url, w.secret FROM webhook_endpoints w
            WHERE w.tenant_id = b.tenant_id AND {SUBSCRIBED.format(type="e.type")}
        ) t
        ON CONFLICT DO NOTHING
        """,
        [e.batch_id for e in events],
        [e.type for e in events],
        [e.url for e in events],
        [e.secret for e in events],
        [e.payload for e in events],
        first_delay_s,
    )
    await conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit


async def claim_due(pool: asyncpg.Pool, limit: int, lease_s: float) -> list[Delivery]:
    """Lease up to ``limit`` due deliveries for one attempt each (skipping locked ones)."""
    rows = await pool.fetch(
        f"""
        UPDATE webhook_deliveries SET attempts = attempts + 1,
            cycle_attempts = cycle_attempts + 1,
            leased_until = now() + make_interval(secs => $2), updated_at = now()
        WHERE id IN (
            SELECT id FROM webhook_deliveries
            WHERE status = 'pending' AND next_attempt_at <= now()
                AND (leased_until IS NULL OR leased_until < now())
            ORDER BY next_attempt_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        )
        RETURNING {_CLAIMED}
        """,
        limit,
        lease_s,
    )
    return [_claimed(row) for row in rows]


async def record(pool: asyncpg.Pool, attempts: Sequence[Attempt]) -> None:
    """Log each attempt and move its delivery on: delivered, retry later, or dead.

    A delivery re-claimed since (its lease ran out) keeps its newer state; the
    late attempt is still logged.
    """
    await pool.execute(
        """
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::int[], $3::timestamptz[], $4::int[], $5::int[],
                                 $6::text[], $7::float8[])
                AS u(delivery_id, attempt, attempted_at, latency_ms, status_code, error,
                     retry_in_s)
        ), logged AS (
            INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, latency_ms,
                                          status_code, error)
            SELECT delivery_id, attempt, attempted_at, latency_ms, status_code, error FROM input
            ON CONFLICT (delivery_id, attempt) DO NOTHING
        )
        UPDATE webhook_deliveries d SET
            status = CASE WHEN i.error IS NULL THEN 'delivered'
                          WHEN i.retry_in_s IS NULL THEN 'dead' ELSE 'pending' END,
            next_attempt_at = CASE WHEN i.error IS NOT NULL AND i.retry_in_s IS NOT NULL
                                   THEN now() + make_interval(secs => i.retry_in_s) END,
            delivered_at = CASE WHEN i.error IS NULL THEN now() ELSE d.delivered_at END,
            leased_until = NULL, last_status_code = i.status_code, last_error = i.error,
            updated_at = now()
        FROM input i
        WHERE d.id = i.delivery_id AND d.attempts = i.attempt
        """,
        [a.delivery_id for a in attempts],
        [a.attempt for a in attempts],
        [a.attempted_at for a in attempts],
        [a.latency_ms for a in attempts],
        [a.status_code for a in attempts],
        [a.error for a in attempts],
        [a.retry_in_s for a in attempts],
    )


async def find(
    pool: asyncpg.Pool,
    *,
    status: DeliveryStatus | None = None,
    job_id: UUID | None = None,
    delivery_id: UUID | None = None,
    tenant_id: str | None = None,
    limit: int = 100,
) -> list[DeliveryView]:
    """Deliveries (of ``tenant_id``, or every tenant's when None), newest first, each
    with its attempts (never its secret)."""
    rows = await pool.fetch(
        """
        SELECT d.id, d.job_id, d.batch_id, d.event_type, d.url, d.status, d.next_attempt_at,
            d.last_status_code, d.last_error, d.created_at, d.updated_at, d.delivered_at,
            coalesce((
                SELECT jsonb_agg(jsonb_build_object(
                    'attempt', a.attempt, 'status_code', a.status_code,
                    'latency_ms', a.latency_ms, 'error', a.error,
                    'attempted_at', a.attempted_at) ORDER BY a.attempt)
                FROM webhook_attempts a WHERE a.delivery_id = d.id), '[]'::jsonb) AS attempts
        FROM webhook_deliveries d
        WHERE ($1::text IS NULL OR d.status = $1) AND ($2::uuid IS NULL OR d.job_id = $2)
            AND ($3::uuid IS NULL OR d.id = $3) AND ($5::text IS NULL OR d.tenant_id = $5)
        ORDER BY d.created_at DESC
        LIMIT $4
        """,
        status,
        job_id,
        delivery_id,
        limit,
        tenant_id,
    )
    return [DeliveryView.model_validate(dict(row)) for row in rows]


class Redelivery(Enum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    MISSING = "missing"


async def redeliver(
    pool: asyncpg.Pool, delivery_id: UUID, tenant_id: str | None = None
) -> Redelivery:
    """Queue a delivery (of ``tenant_id``, when given) for an attempt now, with a fresh
    retry schedule, whatever its status."""
    async with pool.acquire() as conn:
        queued = await conn.fetchval(
            """
            UPDATE webhook_deliveries SET status = 'pending', cycle_attempts = 0,
                next_attempt_at = now(), updated_at = now()
            WHERE id = $1 AND (leased_until IS NULL OR leased_until < now())
                AND ($2::text IS NULL OR tenant_id = $2)
            RETURNING id
            """,
            delivery_id,
            tenant_id,
        )
        if queued is not None:
            await conn.execute(f"NOTIFY {CHANNEL}")
            return Redelivery.QUEUED
        exists = await conn.fetchval(
            "SELECT 1 FROM webhook_deliveries "
            "WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)",
            delivery_id,
            tenant_id,
        )
    return Redelivery.IN_FLIGHT if exists else Redelivery.MISSING
