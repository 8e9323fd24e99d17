"""``GET /v1/jobs/{id}?wait=SECONDS``: answers once the job is final, or when the wait ends."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from producers.api.waiters import RECHECK_S
from tests.conftest import Stack


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=stack.headers, timeout=90
    ) as client:
        yield client


async def _queued_job(pool: asyncpg.Pool) -> uuid.UUID:
    """A job in the ledger that no worker will run (it was never published)."""
    job_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO jobs (id, conversation_id, model, status, request)"
        " VALUES ($1, $2, 'tiny', 'queued', '{}'::jsonb)",
        job_id,
        f"long-poll-{job_id.hex[:8]}",
    )
    return job_id


async def test_wait_returns_a_real_job_once_it_succeeds(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/jobs", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 202
    view = (await http.get(f"/v1/jobs/{response.json()['id']}", params={"wait": 60})).json()
    assert view["status"] == "succeeded"
    assert view["result"]["object"] == "chat.completion"


async def test_wait_returns_as_soon_as_the_job_turns_final(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id = await _queued_job(pool)
    waiting = asyncio.create_task(http.get(f"/v1/jobs/{job_id}", params={"wait": 30}))
    done, _ = await asyncio.wait([waiting], timeout=0.5)
    assert not done, "answered before the job was final"
    await pool.execute(
        "UPDATE jobs SET status = 'failed', error = $2, completed_at = now() WHERE id = $1",
        job_id,
        {"code": "test", "message": "finished by the test"},
    )
    finished = time.monotonic()
    response = await asyncio.wait_for(waiting, timeout=30)
    # Woken by the notification, well before the periodic re-check would have read it.
    assert time.monotonic() - finished < RECHECK_S / 2
    assert response.status_code == 200
    assert response.json()["status"] == "failed"
    assert response.json()["error"]["code"] == "test"


async def test_wait_elapses_with_the_status_it_has_then(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id = await _queued_job(pool)
    began = time.monotonic()
    response = await http.get(f"/v1/jobs/{job_id}", params={"wait": 0.6})
    elapsed = time.monotonic() - began
    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    assert 0.6 <= elapsed < 5


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
async def test_wait_out_of_range_is_422(http: httpx.AsyncClient, wait: str) -> None:
    response = await http.get(f"/v1/jobs/{uuid.uuid4()}", params={"wait": wait})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert "wait" in response.json()["error"]["message"]


async def test_wait_on_an_unknown_job_is_404_at_once(http: httpx.AsyncClient) -> None:
    began = time.monotonic()
    response = await http.get(f"/v1/jobs/{uuid.uuid4()}", params={"wait": 30})
    assert response.status_code == 404
    assert time.monotonic() - began < 5
