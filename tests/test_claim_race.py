"""A batch cancelled while the enricher claims its jobs: a job the cancel finalised is
never revived (real Postgres, two connections, the cancel's lock held in between)."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from kontext.store import enrichment, ledger
from kontext.store.enrichment import Claim
from tests.conftest import wait_for
from tests.factories import job_request


async def test_a_job_cancelled_while_it_is_claimed_stays_failed(pool: asyncpg.Pool) -> None:
    request = job_request("one line of a backfill", priority="background")
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
            enrichment.enrich(enricher, [Claim(request.job_id)], time.time(), None, 8, 0, 60.0)
        )

        async def claim_waits_on_the_lock() -> bool:
            waiting = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%kontext_enrich%'"
            )
            return bool(waiting)

        await wait_for(claim_waits_on_the_lock, timeout=30)
        await cancel.commit()
        claimed = await asyncio.wait_for(claim, timeout=30)
    assert request.job_id not in claimed.contexts
    status = await pool.fetchval("SELECT status FROM jobs WHERE id = $1", request.job_id)
    assert status == "failed"
    # Its conversation's gate is free for the next turn.
    gate = await pool.fetchval(
        "SELECT in_flight FROM conversations WHERE id = $1", request.conversation_id
    )
    assert gate is None
