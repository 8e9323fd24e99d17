"""A batch cancelled while the enricher claims its jobs: a job the cancel finalised is
never revived (real Postgres, two connections, the cancel's lock held in between)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from kontext import ledger, memory
from schemas.events import ChatMessage, JobRequest
from tests.conftest import wait_for


async def test_a_job_cancelled_while_it_is_claimed_stays_failed(pool: asyncpg.Pool) -> None:
    request = JobRequest(
        job_id=uuid.uuid4(),
        conversation_id=f"race-{uuid.uuid4().hex[:8]}",
        model="tiny",
        messages=[ChatMessage(role="user", content="one line of a backfill")],
        max_tokens=8,
        priority="background",
    )
    await ledger.admit(pool, request, None)
    async with pool.acquire() as canceller, pool.acquire() as enricher:
        cancel = canceller.transaction()
        await cancel.start()
        # The cancel has failed the queued job, not yet committed: its row is locked.
        await canceller.execute(
            "UPDATE jobs SET status = 'failed', updated_at = now() WHERE id = $1",
            request.job_id,
        )
        claim = asyncio.create_task(
            memory.claim_with_context(enricher, [(request.job_id, None)], 8, 0, 60.0)
        )

        async def claim_waits_on_the_lock() -> bool:
            waiting = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%kontext_admit_batch%'"
            )
            return bool(waiting)

        await wait_for(claim_waits_on_the_lock, timeout=30)
        await cancel.commit()
        claimed = await asyncio.wait_for(claim, timeout=30)
    assert request.job_id not in claimed
    status = await pool.fetchval("SELECT status FROM jobs WHERE id = $1", request.job_id)
    assert status == "failed"
    # Its conversation's gate is free for the next turn.
    gate = await pool.fetchval(
        "SELECT in_flight FROM conversations WHERE id = $1", request.conversation_id
    )
    assert gate is None
