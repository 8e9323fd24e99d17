"""The enricher's claim on a real Postgres: each conversation's order gate lets one
chat turn through at a time, whether the turn is alone in its batch (one UPDATE for
all such turns) or shares the batch with others of its conversation (in batch
order); the turn in flight passes again when redelivered, and one in flight past
the ordering lease no longer holds the next back."""

from __future__ import annotations

import time
import uuid
from uuid import UUID

import asyncpg

from kontext.store import enrichment, ledger
from kontext.store.enrichment import Claim
from schemas.events import JobRequest
from tests.factories import job_request

LEASE_S = 300.0


async def _claim(pool: asyncpg.Pool, *requests: JobRequest) -> set[UUID]:
    """One claim statement for ``requests``, in this order; the ids it let through."""
    async with pool.acquire() as conn:
        found = await enrichment.enrich(
            conn, [Claim(r.job_id) for r in requests], time.time(), None, 20, 4, LEASE_S
        )
    assert not found.refused
    return set(found.contexts)


async def _gate(pool: asyncpg.Pool, conversation_id: str) -> tuple[UUID | None, list[UUID]]:
    row = await pool.fetchrow(
        "SELECT in_flight, waiting FROM conversations WHERE id = $1", conversation_id
    )
    assert row is not None
    return row["in_flight"], list(row["waiting"])


async def _turns(pool: asyncpg.Pool, conversation_id: str, count: int) -> list[JobRequest]:
    requests = [job_request(f"turn {n}", conversation_id=conversation_id) for n in range(count)]
    for request in requests:
        await ledger.admit(pool, request, None)
    return requests


async def test_one_turn_per_conversation_passes_the_gate(pool: asyncpg.Pool) -> None:
    alone = f"gate-a-{uuid.uuid4().hex[:6]}"
    together = f"gate-b-{uuid.uuid4().hex[:6]}"
    a1, a2 = await _turns(pool, alone, 2)
    b1, b2 = await _turns(pool, together, 2)

    # Alone in its batch with its conversation: through the gate.
    assert await _claim(pool, a1) == {a1.job_id}
    assert await _gate(pool, alone) == (a1.job_id, [])

    # The next turn, alone in a batch with the first still in flight: it waits, once
    # however often it comes; the turn in flight, delivered again, passes again.
    assert await _claim(pool, a2) == set()
    assert await _claim(pool, a2, a1) == {a1.job_id}
    assert await _gate(pool, alone) == (a1.job_id, [a2.job_id])

    # Two turns of one conversation in one batch: the first passes, the second waits.
    assert await _claim(pool, b1, b2) == {b1.job_id}
    assert await _gate(pool, together) == (b1.job_id, [b2.job_id])


async def test_a_turn_in_flight_past_the_lease_no_longer_holds_the_next(
    pool: asyncpg.Pool,
) -> None:
    conversation = f"gate-c-{uuid.uuid4().hex[:6]}"
    stuck, after = await _turns(pool, conversation, 2)
    assert await _claim(pool, stuck) == {stuck.job_id}
    await pool.execute(
        "UPDATE conversations SET in_flight_since = now() - make_interval(secs => $2)"
        " WHERE id = $1",
        conversation,
        LEASE_S + 1,
    )

    assert await _claim(pool, after) == {after.job_id}
    assert await _gate(pool, conversation) == (after.job_id, [])
