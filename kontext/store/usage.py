"""Token usage per tenant, key, model and hour, in Postgres.

Counted by the recorder's statement as each job turns final (once: only the
statement that finalises a job counts it; ``jobs.usage_recorded_at``), see
``kontext.store.ledger.record``. ``totals`` answers ``GET /v1/usage``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from schemas.usage import NIL_KEY


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
