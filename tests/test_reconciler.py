"""A job whose message was lost (the embedded broker keeps messages in memory only)
is driven again from the ledger and answered once."""

from __future__ import annotations

import uuid

import asyncpg

from kontext import ledger
from producers.client import KontextClient
from schemas.events import ChatMessage, JobRequest


async def test_a_job_whose_message_was_lost_is_driven_again(
    client: KontextClient, pool: asyncpg.Pool
) -> None:
    request = JobRequest(
        job_id=uuid.uuid4(),
        conversation_id=f"lost-{uuid.uuid4().hex[:8]}",
        model="tiny",
        messages=[ChatMessage(role="user", content="did you get my message?")],
        max_tokens=8,
    )
    # In the ledger but never published, and past its lease.
    await ledger.admit(pool, request, None)
    await pool.execute(
        "UPDATE jobs SET updated_at = now() - interval '1 hour' WHERE id = $1", request.job_id
    )
    reply = await client.result(request.job_id, timeout=60)
    assert reply.status == "succeeded"
    turns = await pool.fetchval(
        "SELECT count(*) FROM turns WHERE conversation_id = $1", request.conversation_id
    )
    assert turns == 2
    job = await pool.fetchrow("SELECT status, attempts FROM jobs WHERE id = $1", request.job_id)
    assert job is not None and job["status"] == "succeeded" and job["attempts"] == 1
