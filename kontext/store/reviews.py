"""Human review in Postgres: list held results, and release one with a reviewer's decision.

A decision is taken once: the review row is locked, the (possibly replaced)
completion is handed to ``deliver`` (which publishes it to the completions topic
and waits for the broker), and only then is the decision stored, in the same
transaction. The recorder then records,
replies and webhooks it like any other completion (exactly once: a second
decision is refused, and the recorder ignores a duplicate completion).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg

from kontext.metrics import REVIEW_DECISIONS
from schemas.events import JobCompletion, TurnRecord, utcnow
from schemas.reviews import ReviewDecision, ReviewStatus, ReviewView

_COLUMNS = (
    "job_id, tenant_id, conversation_id, model, status, reasons, mean_logprob, request, "
    "original_output, final_output, reviewer, note, created_at, decided_at"
)

TokenCounter = Callable[[str, str], Awaitable[int]]
"""Counts the tokens of a text (second argument) under a model (first argument)."""


class ReviewNotFound(LookupError):
    """No held result for this job (or not the caller's tenant's)."""


class ReviewDecided(Exception):
    """The review was already decided; a second decision is refused."""

    def __init__(self, review: ReviewView) -> None:
        super().__init__(f"job {review.job_id} was already reviewed ({review.status})")
        self.review = review


def _view(row: asyncpg.Record) -> ReviewView:
    return ReviewView.model_validate(dict(row))


async def find(
    pool: asyncpg.Pool,
    *,
    tenant_id: str | None,
    status: ReviewStatus | None = None,
    job_id: UUID | None = None,
    limit: int = 100,
) -> list[ReviewView]:
    """Reviews, oldest first (a queue); ``tenant_id`` None means every tenant's."""
    rows = await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM reviews
        WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::text IS NULL OR status = $2)
            AND ($3::uuid IS NULL OR job_id = $3)
        ORDER BY created_at, job_id LIMIT $4
        """,
        tenant_id,
        status,
        job_id,
        limit,
    )
    return [_view(row) for row in rows]


async def _final(
    held: dict[str, Any], decision: ReviewDecision, count: TokenCounter
) -> JobCompletion:
    """The completion to deliver: the held one, or with the reviewer's answer."""
    completion = JobCompletion.model_validate(held)
    update: dict[str, Any] = {"completed_at": utcnow()}
    if decision.action == "replace" and decision.content is not None:
        content = decision.content
        tokens = await count(completion.model, content)
        turns = [t for t in completion.new_turns if t.role != "assistant"]
        turns.append(TurnRecord(role="assistant", content=content, tokens=tokens))
        update |= {"output": content, "new_turns": turns, "logprobs": None}
    outcome = "approved" if decision.action == "approve" else "replaced"
    if completion.context is not None:
        update["context"] = completion.context.model_copy(update={"review": outcome})
    return completion.model_copy(update=update)


Deliver = Callable[[JobCompletion], Awaitable[None]]
"""Publishes a decided completion and returns once the broker has it."""


async def decide(
    pool: asyncpg.Pool,
    deliver: Deliver,
    job_id: UUID,
    decision: ReviewDecision,
    *,
    tenant_id: str | None,
    reviewer: str,
    count_tokens: TokenCounter,
) -> ReviewView:
    """Release a held result with ``decision``; ``tenant_id`` None: any tenant's."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""
            SELECT {_COLUMNS}, completion FROM reviews
            WHERE job_id = $1 AND ($2::text IS NULL OR tenant_id = $2) FOR UPDATE
            """,
            job_id,
            tenant_id,
        )
        if row is None:
            raise ReviewNotFound(f"no review for job {job_id}")
        if row["status"] != "pending":
            raise ReviewDecided(_view(row))
        final = await _final(row["completion"], decision, count_tokens)
        await deliver(final)
        # The job's updated_at starts the lease after which the reconciler publishes
        # the decided completion again, should this message be lost.
        decided = await conn.fetchrow(
            f"""
            WITH touched AS (UPDATE jobs SET updated_at = now() WHERE id = $1)
            UPDATE reviews SET status = $2, final_output = $3, reviewer = $4, note = $5,
                completion = $6, decided_at = now()
            WHERE job_id = $1 RETURNING {_COLUMNS}
            """,
            job_id,
            "approved" if decision.action == "approve" else "replaced",
            final.output,
            reviewer,
            decision.note,
            final.model_dump(mode="json"),
        )
    REVIEW_DECISIONS.labels(decision.action).inc()
    assert decided is not None
    return _view(decided)


DECIDED_UNRECORDED = """
UPDATE jobs j SET updated_at = now()
FROM reviews r
WHERE r.job_id = j.id AND j.id IN (
    SELECT jj.id FROM jobs jj JOIN reviews rr ON rr.job_id = jj.id
    WHERE jj.status = 'needs_review' AND rr.status <> 'pending'
        AND jj.updated_at < now() - $1::interval
    ORDER BY jj.updated_at LIMIT $2
    FOR UPDATE OF jj SKIP LOCKED)
RETURNING r.completion
"""


async def decided_unrecorded(
    pool: asyncpg.Pool, lease: timedelta, limit: int
) -> list[JobCompletion]:
    """The decided completions not recorded within ``lease`` (their message was lost,
    e.g. with an embedded broker's restart), their lease restarted: publish them again;
    the recorder records each once."""
    rows = await pool.fetch(DECIDED_UNRECORDED, lease, limit)
    return [JobCompletion.model_validate(row["completion"]) for row in rows]
