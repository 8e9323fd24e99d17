"""The enricher's one round trip per micro-batch (``kontext_enrich``, migration 0013).

Each job, in order: its tenant's limits decide it (once: a job redelivered after
it was admitted passes), the conversation's order gate lets it through (one chat
turn in flight at a time), and its memory is read (recent turns, summaries,
recalled older turns). A claimed job keeps its recall query's embedding
(``jobs.query_embedding``) for the recorder to store with its user turn. Jobs
already final, and chat turns waiting for an earlier turn of their conversation
(the recorder sends them again when that one is recorded), come back with
neither a context nor a refusal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

import asyncpg
import numpy as np
from pgvector import Vector

from kontext.store.memory import MemoryContext, StoredSummary, StoredTurn
from schemas.limits import TenantLimitStatus


@dataclass(frozen=True)
class Claim:
    """A job to enrich: its id, its new message's embedding (None: no recall), and what
    its tenant's limits charge it: ``cost`` in the tokens-per-minute window, ``hold``
    against the budget until it settles."""

    job_id: UUID
    query: np.ndarray | None = None
    cost: int = 0
    hold: int = 0


@dataclass(frozen=True)
class Limits:
    """The deployment's limits where a tenant has none of its own (None: no limit)."""

    rpm: int | None = None
    tpm: int | None = None
    budget: int | None = None


@dataclass(frozen=True)
class Refusal:
    """A job its tenant's limits refused: the error code, message and HTTP status a
    client would see, and when to retry (seconds), if known."""

    code: str
    message: str
    status: int
    retry_after_s: float | None


@dataclass
class Enrichment:
    contexts: dict[UUID, MemoryContext] = field(default_factory=dict)
    """The admitted jobs' memory."""
    refused: dict[UUID, Refusal] = field(default_factory=dict)
    tenants: list[TenantLimitStatus] = field(default_factory=list)
    """The limited tenants of the batch, as the API may know them."""


async def enrich(
    conn: asyncpg.Connection,
    claims: Sequence[Claim],
    now_s: float,
    limits: Limits | None,
    recent_turns: int,
    recall_k: int,
    lease_s: float,
) -> Enrichment:
    """Decide, claim and read memory for ``claims`` in one statement. ``limits``: the
    deployment's defaults, or None when tenant limits are off."""
    defaults = limits or Limits()
    rows = await conn.fetch(
        """
        SELECT * FROM kontext_enrich($1::uuid[], $2::vector[], $3::int[], $4::bigint[], $5,
            $6, $7, $8, $9, $10, $11, $12::interval)
        """,
        [c.job_id for c in claims],
        [Vector(c.query) if c.query is not None else None for c in claims],
        [c.cost for c in claims],
        [c.hold for c in claims],
        now_s,
        defaults.rpm,
        defaults.tpm,
        defaults.budget,
        limits is not None,
        recent_turns,
        recall_k,
        timedelta(seconds=lease_s),
    )
    found = Enrichment()
    contexts = found.contexts
    for row in rows:
        part = row["part"]
        if part == "refused":
            found.refused[row["job_id"]] = Refusal(
                row["code"], row["content"], row["status"], row["retry_after"]
            )
            continue
        if part == "tenant":
            found.tenants.append(
                TenantLimitStatus(
                    tenant_id=row["tenant_id"],
                    blocked_until=row["blocked_until"],
                    blocked_by=row["blocked_by"],
                    budget=row["budget"],
                    budget_spent=row["spent"],
                )
            )
            continue
        job_id = row["job_id"]
        context = contexts.get(job_id)
        if context is None:  # the job's first row (a context built for each would be waste)
            context = contexts[job_id] = MemoryContext()
        if part == "summary":
            context.summaries.append(
                StoredSummary(
                    row["level"], row["first_seq"], row["last_seq"], row["content"], row["tokens"]
                )
            )
        elif part in ("recent", "recall"):
            similarity = row["similarity"]
            if similarity is not None and math.isnan(similarity):
                # A vector of zeros has no direction: nothing is similar to it.
                if part == "recall":
                    continue
                similarity = None
            turn = StoredTurn(
                row["seq"],
                row["role"],
                row["content"],
                row["tokens"],
                similarity,
                row["conversation_id"],
            )
            (context.recent if part == "recent" else context.recalled).append(turn)
    for context in found.contexts.values():
        context.recent.sort(key=lambda t: t.seq)
        context.summaries.sort(key=lambda s: (s.first_seq, -s.level))
    return found
