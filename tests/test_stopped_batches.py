"""A cancel or an expiry stops a batch's lines that are already past the enricher: the
inference worker fails them before its engine runs them. Real Postgres, real broker,
the real inference worker and policy chain."""

from __future__ import annotations

import uuid
from uuid import UUID

import asyncpg

from kontext.app.embedded import EmbeddedBroker
from kontext.store import batches
from kontext.store.batches import NewBatch
from schemas.events import ContextInfo, EnrichedRequest, JobRequest
from tests.conftest import run_inference
from tests.factories import job_request
from workers.engines.null import REPLY, NullEngine
from workers.policies.compose import ChainParts, build_chain


async def _running_batch(pool: asyncpg.Pool, lines: int) -> tuple[UUID, list[JobRequest]]:
    """A batch in progress whose lines the enricher has claimed (``running``)."""
    row, _ = await batches.create(
        pool,
        NewBatch(
            endpoint="/v1/chat/completions",
            completion_window_s=24 * 3600.0,
            completion_window="24h",
            input_sha256=uuid.uuid4().hex,
            total=lines,
            errors=[],
            metadata={},
            webhook=None,
            idempotency_key=None,
        ),
    )
    requests = [
        job_request(f"line {i} of {row.id}", model="null", priority="background", batch_id=row.id)
        for i in range(lines)
    ]
    await batches.admit(pool, row.id, [(f"line-{i}", r) for i, r in enumerate(requests)])
    await batches.start(pool, row.id)
    await pool.execute("UPDATE jobs SET status = 'running' WHERE batch_id = $1", row.id)
    return row.id, requests


def _enriched(request: JobRequest) -> EnrichedRequest:
    prompt = request.messages[-1].content
    return EnrichedRequest(
        request=request, prompt=prompt, context=ContextInfo(prompt_tokens=1), new_turns=[]
    )


async def test_lines_of_a_cancelled_or_expired_batch_fail_before_the_engine(
    broker: EmbeddedBroker, own_pool: asyncpg.Pool
) -> None:
    pool = own_pool  # the lines this test leaves running are no other stack's
    cancelled_id, cancelled = await _running_batch(pool, 2)
    expired_id, expired = await _running_batch(pool, 1)
    _, going_on = await _running_batch(pool, 1)
    await batches.cancel(pool, cancelled_id, "default")
    await pool.execute("UPDATE batches SET expires_at = now() WHERE id = $1", expired_id)
    async with pool.acquire() as conn:
        assert expired_id in await batches.expire(conn)
    interactive = job_request(f"hello {uuid.uuid4()}", model="null")

    jobs = [*cancelled, *expired, *going_on, interactive]
    completions = await run_inference(
        broker,
        NullEngine(),
        [_enriched(job) for job in jobs],
        lambda settings: build_chain(settings, ChainParts(pool=pool)),
    )
    got = {c.job_id: c for c in completions}
    assert set(got) == {job.job_id for job in jobs}
    for job in cancelled:
        error = got[job.job_id].error
        assert got[job.job_id].status == "failed" and got[job.job_id].usage is None
        assert error is not None and error.code == "batch_cancelled"
    error = got[expired[0].job_id].error
    assert error is not None and error.code == "batch_expired"
    for job in (going_on[0], interactive):
        assert got[job.job_id].status == "succeeded" and got[job.job_id].output == REPLY
