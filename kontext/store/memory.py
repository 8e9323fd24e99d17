"""Conversation memory in Postgres: context for prompts, embeddings, summaries.

Raw asyncpg. What a prompt holds is read by the enricher's one round trip per
micro-batch (``kontext.store.enrichment``); the rest is the recorder's upkeep after
its replies (``workers.memory``), off the request path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np
from pgvector import Vector

from schemas.events import Role


@dataclass(slots=True)
class StoredTurn:
    seq: int
    role: Role
    content: str
    tokens: int
    similarity: float | None = None
    conversation_id: str | None = None


@dataclass(slots=True)
class StoredSummary:
    level: int
    first_seq: int
    last_seq: int
    content: str
    tokens: int


@dataclass
class MemoryContext:
    """What Postgres holds for one job's prompt (recent turns oldest first)."""

    recent: list[StoredTurn] = field(default_factory=list)
    summaries: list[StoredSummary] = field(default_factory=list)
    recalled: list[StoredTurn] = field(default_factory=list)


async def unembedded_turns(
    conn: asyncpg.Connection, conversation_ids: Sequence[str], limit: int
) -> list[tuple[int, str]]:
    rows = await conn.fetch(
        """
        SELECT id, content FROM turns
        WHERE conversation_id = ANY($1::text[]) AND embedding IS NULL
        ORDER BY id LIMIT $2
        """,
        list(conversation_ids),
        limit,
    )
    return [(row["id"], row["content"]) for row in rows]


@dataclass(frozen=True)
class SummaryState:
    """Per conversation: what is not yet summarised, and what could roll up."""

    conversation_id: str
    tenant_id: str
    covered_seq: int
    pending_first: int | None
    pending_last: int | None
    pending_tokens: int
    unrolled: dict[int, int]
    """level -> tokens of summaries at that level not yet rolled up."""
    unrolled_count: dict[int, int]
    summary_in_flight: bool


async def keep(
    conn: asyncpg.Connection,
    turn_ids: Sequence[int],
    vectors: np.ndarray | Sequence[np.ndarray],
    conversation_ids: Sequence[str],
    keep_recent: int,
) -> list[SummaryState]:
    """Store the turns' embeddings and read the conversations' summary states, in one
    statement (the states do not depend on the embeddings)."""
    rows = await conn.fetch(
        """
        WITH embedded AS (
            UPDATE turns SET embedding = v.embedding
            FROM unnest($3::bigint[], $4::vector[]) AS v(id, embedding)
            WHERE turns.id = v.id
        ), conv AS MATERIALIZED (  -- once per conversation, not per turn joined to it
            SELECT c.id, c.tenant_id,
                coalesce((SELECT max(last_seq) FROM summaries s
                          WHERE s.conversation_id = c.id AND s.level = 1), 0) AS covered,
                coalesce((SELECT max(seq) FROM turns t WHERE t.conversation_id = c.id), 0)
                    AS last_seq,
                EXISTS (SELECT 1 FROM jobs j WHERE j.conversation_id = c.id
                        AND j.kind = 'summary' AND j.status IN ('queued', 'running'))
                    AS in_flight
            FROM conversations c WHERE c.id = ANY($1::text[])
        )
        SELECT conv.id, conv.tenant_id, conv.covered, conv.in_flight,
            p.first_seq, p.last_seq, p.tokens,
            (SELECT coalesce(jsonb_object_agg(level, tokens), '{}'::jsonb) FROM (
                SELECT level, sum(tokens)::int AS tokens FROM summaries
                WHERE conversation_id = conv.id AND NOT rolled_up GROUP BY level) x) AS unrolled,
            (SELECT coalesce(jsonb_object_agg(level, n), '{}'::jsonb) FROM (
                SELECT level, count(*)::int AS n FROM summaries
                WHERE conversation_id = conv.id AND NOT rolled_up GROUP BY level) y) AS counts
        FROM conv CROSS JOIN LATERAL (
            -- What is not yet summarised, read through the conversation's own index.
            SELECT min(t.seq) AS first_seq, max(t.seq) AS last_seq,
                coalesce(sum(t.tokens), 0) AS tokens
            FROM turns t WHERE t.conversation_id = conv.id
                AND t.seq > conv.covered AND t.seq <= conv.last_seq - $2
        ) p
        """,
        list(conversation_ids),
        keep_recent,
        list(turn_ids),
        [Vector(v) for v in vectors],  # binary: no text to format and parse
    )
    return [
        SummaryState(
            conversation_id=row["id"],
            tenant_id=row["tenant_id"],
            covered_seq=row["covered"],
            pending_first=row["first_seq"],
            pending_last=row["last_seq"],
            pending_tokens=row["tokens"],
            unrolled={int(k): int(v) for k, v in row["unrolled"].items()},
            unrolled_count={int(k): int(v) for k, v in row["counts"].items()},
            summary_in_flight=row["in_flight"],
        )
        for row in rows
    ]


async def turns_between(
    conn: asyncpg.Connection, conversation_id: str, first_seq: int, last_seq: int
) -> list[StoredTurn]:
    rows = await conn.fetch(
        """
        SELECT seq, role, content, tokens FROM turns
        WHERE conversation_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq
        """,
        conversation_id,
        first_seq,
        last_seq,
    )
    return [StoredTurn(r["seq"], r["role"], r["content"], r["tokens"]) for r in rows]


async def unrolled_summaries(
    conn: asyncpg.Connection, conversation_id: str, level: int
) -> list[StoredSummary]:
    rows = await conn.fetch(
        """
        SELECT level, first_seq, last_seq, content, tokens FROM summaries
        WHERE conversation_id = $1 AND level = $2 AND NOT rolled_up ORDER BY first_seq
        """,
        conversation_id,
        level,
    )
    return [StoredSummary(**dict(r)) for r in rows]


async def store_summary(
    conn: asyncpg.Connection, conversation_id: str, summary: StoredSummary
) -> bool:
    """Insert a summary; a level-N summary marks the level N-1 ones it covers rolled up.

    Idempotent: the same (conversation, level, first turn) twice stores one.
    """
    async with conn.transaction():
        inserted = await conn.fetchval(
            """
            INSERT INTO summaries (conversation_id, level, first_seq, last_seq, content, tokens)
            SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM conversations WHERE id = $1)
            ON CONFLICT (conversation_id, level, first_seq) DO NOTHING
            RETURNING id
            """,
            conversation_id,
            summary.level,
            summary.first_seq,
            summary.last_seq,
            summary.content,
            summary.tokens,
        )
        if inserted is not None and summary.level > 1:
            await conn.execute(
                """
                UPDATE summaries SET rolled_up = true
                WHERE conversation_id = $1 AND level = $2
                    AND first_seq >= $3 AND last_seq <= $4
                """,
                conversation_id,
                summary.level - 1,
                summary.first_seq,
                summary.last_seq,
            )
    return inserted is not None


async def conversation(
    pool: asyncpg.Pool, conversation_id: str, tenant_id: str
) -> dict[str, Any] | None:
    """The tenant's conversation with its turns and summaries, or None."""
    async with pool.acquire() as conn:
        head = await conn.fetchrow(
            "SELECT id, user_id, created_at, updated_at FROM conversations "
            "WHERE id = $1 AND tenant_id = $2",
            conversation_id,
            tenant_id,
        )
        if head is None:
            return None
        turns = await conn.fetch(
            """
            SELECT seq, role, content, tokens, job_id, embedding IS NOT NULL AS embedded,
                created_at
            FROM turns WHERE conversation_id = $1 ORDER BY seq
            """,
            conversation_id,
        )
        summaries = await conn.fetch(
            """
            SELECT level, first_seq, last_seq, content, tokens, rolled_up, created_at
            FROM summaries WHERE conversation_id = $1 ORDER BY level, first_seq
            """,
            conversation_id,
        )
    return {
        **dict(head),
        "turns": [dict(t) for t in turns],
        "summaries": [dict(s) for s in summaries],
    }


async def forget(pool: asyncpg.Pool, conversation_id: str, tenant_id: str) -> bool:
    """Delete the tenant's conversation: its turns (with their embeddings), summaries and
    jobs. Another tenant's conversation of that id is left alone."""
    async with pool.acquire() as conn, conn.transaction():
        jobs: str = await conn.execute(
            "DELETE FROM jobs WHERE conversation_id = $1 AND tenant_id = $2",
            conversation_id,
            tenant_id,
        )
        conv: str = await conn.execute(
            "DELETE FROM conversations WHERE id = $1 AND tenant_id = $2",
            conversation_id,
            tenant_id,
        )
    return conv != "DELETE 0" or jobs != "DELETE 0"
