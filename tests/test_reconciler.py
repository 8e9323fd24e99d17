"""A job whose message was lost (the embedded broker keeps messages in memory only)
is driven again from the ledger and answered once."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from kontext.app.embedded import EmbeddedPostgres
from kontext.connections import create_pool, create_producer
from kontext.settings import Settings
from kontext.store import ledger
from producers.client import KontextClient
from schemas.events import JobRequest
from tests.conftest import Stack, own_database, start_stack, wait_for
from tests.factories import job_request
from workers.reconciler import Reconciler


@asynccontextmanager
async def serving_too(stack: Stack, pool: asyncpg.Pool, model: str) -> AsyncIterator[Reconciler]:
    """A reconciler of the test stack's deployment that also serves ``model`` (a lane
    of a test's own)."""
    producer = create_producer(stack.settings)
    await producer.start()
    try:
        serving = stack.settings.model_copy(update={"engines": [*stack.settings.engines, model]})
        yield Reconciler(serving, pool, producer)
    finally:
        await producer.stop()


async def test_a_job_whose_message_was_lost_is_driven_again(
    client: KontextClient, pool: asyncpg.Pool
) -> None:
    request = job_request("did you get my message?")
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


async def test_a_background_job_is_stuck_only_when_its_lane_stalls(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    model = f"lane-{uuid.uuid4().hex[:6]}"  # a lane of its own: no other test's jobs in it

    def background(content: str) -> JobRequest:
        return job_request(content, model=model, priority="background")

    waiting, finished = background("line 2 of a backfill"), background("line 1")
    for request in (waiting, finished):
        await ledger.admit(pool, request, None)
    # Another job of its lane finished just now; the waiting job is past its lease.
    await pool.execute("UPDATE jobs SET status = 'succeeded' WHERE id = $1", finished.job_id)
    await pool.execute(
        "UPDATE jobs SET updated_at = now() - interval '1 hour' WHERE id = $1", waiting.job_id
    )

    async def lease_age_s() -> float:
        age = await pool.fetchval(
            "SELECT extract(epoch FROM now() - updated_at) FROM jobs WHERE id = $1",
            waiting.job_id,
        )
        return float(age)

    async with serving_too(stack, pool, model) as reconciler:
        await reconciler.sweep()
        assert await lease_age_s() > 3000, "its lane is moving: not stuck, not re-driven"

        # The lane finished nothing within the lease: now the job is stuck.
        await pool.execute(
            "UPDATE jobs SET updated_at = now() - interval '1 hour' WHERE id = $1",
            finished.job_id,
        )
        await reconciler.sweep()
        assert await lease_age_s() < 600, "a stalled lane's job is re-driven"


async def test_a_deployment_re_drives_only_the_models_it_serves(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    """Two deployments on one database (as the test stacks are) each re-drive their own
    models' stuck jobs: one for a model served elsewhere is left to that deployment."""
    ours, theirs = (f"m-{uuid.uuid4().hex[:6]}" for _ in range(2))

    def stuck(model: str) -> JobRequest:
        return job_request("anyone?", model=model)

    mine, other = stuck(ours), stuck(theirs)
    for request in (mine, other):
        await ledger.admit(pool, request, None)
        await pool.execute(
            "UPDATE jobs SET updated_at = now() - interval '1 hour' WHERE id = $1", request.job_id
        )
    serving = stack.settings.model_copy(update={"engines": [ours]})
    producer = create_producer(serving)
    await producer.start()
    try:
        await Reconciler(serving, pool, producer).sweep()
    finally:
        await producer.stop()
    ages = {
        row["id"]: row["age"]
        for row in await pool.fetch(
            "SELECT id, extract(epoch FROM now() - updated_at) AS age FROM jobs"
            " WHERE id = ANY($1::uuid[])",
            [mine.job_id, other.job_id],
        )
    }
    assert ages[mine.job_id] < 600, "its own model's stuck job is re-driven"
    assert ages[other.job_id] > 3000, "another deployment's job is left alone"


async def test_an_interactive_job_behind_a_backlog_is_re_driven_only_once_a_later_one_finished(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    """Past its lease, a job claimed while its lane works through what came before it
    is waiting (a restarted worker's backlog), not lost: re-driving each such job would
    add to the very backlog that delays it. Once a job claimed after it has finished,
    its message was lost: it is re-driven."""
    model = f"lane-{uuid.uuid4().hex[:6]}"  # a lane of its own: no other test's jobs in it
    earlier, waiting, later = (job_request(text, model=model) for text in ("1", "2", "3"))
    for request in (earlier, waiting, later):
        await ledger.admit(pool, request, None)
    # Claimed in order an hour ago (their lease long past); the earliest finished just now.
    for minutes, request in ((62, earlier), (61, waiting), (60, later)):
        await pool.execute(
            "UPDATE jobs SET status = 'running', attempts = 1,"
            " claimed_at = now() - make_interval(mins => $2),"
            " updated_at = now() - make_interval(mins => $2) WHERE id = $1",
            request.job_id,
            minutes,
        )
    await pool.execute(
        "UPDATE jobs SET status = 'succeeded', updated_at = now() WHERE id = $1", earlier.job_id
    )

    async def re_driven() -> set[uuid.UUID]:
        rows = await pool.fetch(
            "SELECT id FROM jobs WHERE id = ANY($1::uuid[]) AND status = 'running'"
            " AND updated_at > now() - interval '10 minutes'",
            [waiting.job_id, later.job_id],
        )
        return {row["id"] for row in rows}

    async with serving_too(stack, pool, model) as reconciler:
        await reconciler.sweep()
        assert await re_driven() == set(), "only what came before them has finished"

        await pool.execute(
            "UPDATE jobs SET status = 'succeeded', updated_at = now() WHERE id = $1", later.job_id
        )
        await reconciler.sweep()
        assert await re_driven() == {waiting.job_id}, "a job claimed after it has finished"


async def test_up_on_a_new_embedded_broker_drives_the_ledgers_open_jobs_at_once(
    database: EmbeddedPostgres, workdir: Path
) -> None:
    """The embedded broker keeps messages in memory: after ``kontext up`` stopped with jobs
    queued, the next one's new broker has none of them. It publishes them again at
    start, not a lease (here 600 s) later."""
    url = await own_database(database)
    pool = await create_pool(Settings(database_url=url))
    try:
        lost = job_request("queued when the last stack stopped")
        await ledger.admit(pool, lost, None)  # in the ledger, on no broker
        env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
        env.update(
            DATABASE_URL=url,
            KONTEXT_DATA_DIR=str(workdir / f"fresh-broker-{uuid.uuid4().hex[:6]}"),
            KONTEXT_JOB_LEASE_S="600",
        )
        stack = start_stack(["up", "--engine", "tiny", "--port", "0"], env, workdir)
        try:

            async def answered() -> bool:
                job = await ledger.get(pool, lost.job_id)
                return job is not None and job.status == "succeeded"

            await wait_for(answered, timeout=60, interval=0.2)
        finally:
            assert stack.stop() == 0, "".join(stack.output[-40:])
    finally:
        await pool.close()
