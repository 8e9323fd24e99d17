"""Per-tenant rate limits and token budgets across two API replicas.

One ``kontext up`` (API replica A and every worker, null engine) and a second
API-only process (replica B) share the broker and the database. Concurrent
submitters on both replicas must not push a tenant past its limit or budget by
even one job. The enricher decides in Postgres (``kontext_enrich``); the window
and settlement rules are also checked against that function directly.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.connections import create_producer
from kontext.settings import Settings
from kontext.store import enrichment, keys, ledger
from kontext.store.enrichment import Claim, Limits
from producers.backfill import create_batch
from schemas.events import JobRequest
from tests.conftest import Stack, stack_env, start_stack, wait_for
from tests.factories import job_request
from workers.intake import publish
from workers.policies.limits import budget_reservation, reservation

RPM = 10
MAX_TOKENS = 40
BURST_JOBS = 5
MESSAGE = "How many tokens will this use?"
LONG = " ".join(["word"] * 120)
UNSERVED = "tiny"
"""Served (accepted, enriched) but no inference worker runs it in this module."""


@dataclass
class Replicas:
    a: Stack
    b: Stack
    env: dict[str, str]


@pytest.fixture(scope="module")
def replicas(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> Iterator[Replicas]:
    env = stack_env(broker, database, prefix=f"lim{uuid.uuid4().hex[:8]}")
    env.update(
        KONTEXT_ENGINES=f"null,{UNSERVED}",
        KONTEXT_INFERENCE_ENGINES="null",
        KONTEXT_POLICY_LIMITS="true",
        # A batch's lines are recorded and published in several chunks.
        KONTEXT_BACKFILL_CHUNK_SIZE="4",
    )
    a = start_stack(["up", "--port", "0"], env, workdir)
    try:
        b = start_stack(["worker", "api", "--port", "0"], env, workdir)
    except BaseException:
        a.stop()
        raise
    yield Replicas(a, b, env)
    assert b.stop() == 0, "".join(b.output[-40:])
    assert a.stop() == 0, "".join(a.output[-40:])


async def _tenant(pool: asyncpg.Pool, **limits: int) -> keys.NewKey:
    """A new tenant with ``limits`` (rpm, tpm, token_budget), and its API key."""
    created = await keys.create(pool, f"t-{uuid.uuid4().hex[:10]}")
    for column, value in limits.items():
        await pool.execute(
            f"UPDATE tenants SET {column} = $2 WHERE id = $1", created.tenant_id, value
        )
    return created


def _probe(text: str = MESSAGE) -> JobRequest:
    return job_request(text, conversation_id="x", model="null", max_tokens=MAX_TOKENS)


def _cost() -> int:
    """What one test job counts in a tokens-per-minute window."""
    return reservation(_probe())


def _hold(replicas: Replicas) -> int:
    """What one test job holds against its budget in the replicas' deployment: the
    most it can use (its prompt budget, memory included, plus max_tokens)."""
    settings = Settings(
        engines=replicas.env["KONTEXT_ENGINES"].split(","),
        context_budget_tokens=int(replicas.env["KONTEXT_CONTEXT_BUDGET_TOKENS"]),
        budget_reserve="max",
    )
    return budget_reservation(settings, _probe())


@pytest.fixture
async def http(replicas: Replicas) -> AsyncIterator[list[httpx.AsyncClient]]:
    async with (
        httpx.AsyncClient(base_url=replicas.a.api_url, timeout=30) as a,
        httpx.AsyncClient(base_url=replicas.b.api_url, timeout=30) as b,
    ):
        yield [a, b]


async def _submit(
    client: httpx.AsyncClient, key: str, model: str = "null", text: str = MESSAGE
) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": MAX_TOKENS,
    }
    return await client.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"})


async def _final(client: httpx.AsyncClient, key: str, job_id: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(6):
        job: dict[str, Any] = (
            await client.get(f"/v1/jobs/{job_id}", params={"wait": 10}, headers=headers)
        ).json()
        if job["status"] in ("succeeded", "failed"):
            return job
    raise AssertionError(f"job {job_id} not final: {job}")


async def _create_batch(client: httpx.AsyncClient, key: str, text: str) -> httpx.Response:
    """A batch of the key's tenant from ``text``, uploaded as its input file."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=client.base_url, headers=headers, timeout=30) as keyed:
        return await create_batch(keyed, text.encode())


def _unserved_lines(n: int) -> str:
    """A batch input of ``n`` lines ``line-0``... for the model no worker runs."""
    body = {
        "model": UNSERVED,
        "messages": [{"role": "user", "content": MESSAGE}],
        "max_tokens": MAX_TOKENS,
    }
    return "\n".join(
        orjson.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
        ).decode()
        for i in range(n)
    )


def _retry_after(response: httpx.Response) -> int:
    value = response.headers.get("Retry-After")
    assert value is not None and value.isdigit() and int(value) >= 1, response.headers
    return int(value)


async def _burst(
    http: list[httpx.AsyncClient], key: str, count: int
) -> tuple[list[dict[str, Any]], list[httpx.Response]]:
    """``count`` concurrent submissions alternating between the replicas; returns the
    accepted jobs once final, and the refused responses."""
    responses = await asyncio.gather(*(_submit(http[i % 2], key) for i in range(count)))
    accepted = [r for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code != 202]
    jobs = await asyncio.gather(*(_final(http[0], key, r.json()["id"]) for r in accepted))
    return list(jobs), refused


async def test_rpm_holds_exactly_across_two_replicas(
    pool: asyncpg.Pool, http: list[httpx.AsyncClient]
) -> None:
    key = (await _tenant(pool, rpm=RPM)).key
    jobs, refused = await _burst(http, key, 40)

    succeeded = [j for j in jobs if j["status"] == "succeeded"]
    assert len(succeeded) == RPM
    for job in jobs:
        if job["status"] == "failed":
            assert job["error"]["code"] == "rate_limited", job
            assert "retry after" in job["error"]["message"]
    for response in refused:
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "rate_limited"
        assert _retry_after(response) <= 61
    assert len(jobs) + len(refused) == 40

    # Once the enricher has published the full window, both replicas refuse at once,
    # with Retry-After, and nothing more is admitted.
    for client in http:
        answers: list[httpx.Response] = []

        async def refused_here(
            client: httpx.AsyncClient = client, answers: list[httpx.Response] = answers
        ) -> bool:
            answers.append(await _submit(client, key))
            return answers[-1].status_code == 429

        await wait_for(refused_here, timeout=20, interval=0.2)
        assert 1 <= _retry_after(answers[-1]) <= 61
        late = [r.json()["id"] for r in answers if r.status_code == 202]
        for job_id in late:
            assert (await _final(client, key, job_id))["status"] == "failed"


async def test_budget_holds_exactly_across_two_replicas(
    pool: asyncpg.Pool, http: list[httpx.AsyncClient], replicas: Replicas
) -> None:
    # UNSERVED has no inference worker here: admitted jobs keep their reservation for
    # the whole burst (nothing settles early), so the bound is exact whatever the timing.
    hold = _hold(replicas)
    tenant = await _tenant(pool, token_budget=BURST_JOBS * hold + hold // 2)
    responses = await asyncio.gather(
        *(_submit(http[i % 2], tenant.key, model=UNSERVED) for i in range(20))
    )
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
    ids = [r.json()["id"] for r in responses]
    headers = {"Authorization": f"Bearer {tenant.key}"}

    async def statuses() -> list[dict[str, Any]]:
        return [(await http[0].get(f"/v1/jobs/{job_id}", headers=headers)).json() for job_id in ids]

    async def decided() -> bool:
        return sum(j["status"] == "failed" for j in await statuses()) >= 20 - BURST_JOBS

    await wait_for(decided, timeout=30, interval=0.2)
    jobs = await statuses()
    failed = [j for j in jobs if j["status"] == "failed"]
    assert len(failed) == 20 - BURST_JOBS
    assert all(j["error"]["code"] == "budget_exhausted" for j in failed)
    admitted = [j for j in jobs if j["status"] != "failed"]
    assert len(admitted) == BURST_JOBS
    assert all(j["status"] in ("queued", "running") for j in admitted)  # no worker for them


async def test_a_batch_holds_budget_but_is_not_paced_by_the_per_minute_limits(
    pool: asyncpg.Pool, http: list[httpx.AsyncClient], replicas: Replicas
) -> None:
    # Each line holds budget like a job; rpm 1 does not apply to the background lane.
    hold = _hold(replicas)
    tenant = await _tenant(pool, token_budget=3 * hold + hold // 2, rpm=1)
    headers = {"Authorization": f"Bearer {tenant.key}"}
    # No worker runs UNSERVED: admitted lines keep their hold.
    created = await _create_batch(http[0], tenant.key, _unserved_lines(10))
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]

    async def counts() -> dict[str, int]:
        got: dict[str, int] = (
            await http[1].get(f"/v1/batches/{batch_id}", headers=headers)
        ).json()["request_counts"]
        return got

    async def decided() -> bool:
        return (await counts())["failed"] >= 7

    await wait_for(decided, timeout=30, interval=0.2)
    assert await counts() == {"total": 10, "completed": 0, "failed": 7}
    # The batch never ends (three lines are held, never run): its failed jobs, as its
    # error file would list them once it had ended.
    refused = await pool.fetch(
        "SELECT custom_id, error->>'code' AS code FROM jobs "
        "WHERE batch_id = $1 AND status = 'failed'",
        uuid.UUID(batch_id),
    )
    assert {line["code"] for line in refused} == {"budget_exhausted"}
    # Three lines hold the budget, every other one is refused, each exactly once (lines
    # of different conversations are decided in the order they reach the enricher).
    refused_ids = [line["custom_id"] for line in refused]
    assert len(refused_ids) == len(set(refused_ids)) == 7
    rows = await pool.fetch(
        "SELECT status = 'failed' AS failed, count(*) AS n FROM jobs WHERE batch_id = $1 "
        "GROUP BY 1",
        uuid.UUID(batch_id),
    )
    assert {r["failed"]: r["n"] for r in rows} == {False: 3, True: 7}  # 3 held, not run
    cancelled = await http[0].post(f"/v1/batches/{batch_id}/cancel", headers=headers)
    assert cancelled.status_code == 200, cancelled.text


async def test_cancelling_a_batch_releases_the_budget_its_unstarted_lines_held(
    pool: asyncpg.Pool, http: list[httpx.AsyncClient], replicas: Replicas
) -> None:
    hold = _hold(replicas)
    tenant = await _tenant(pool, token_budget=2 * hold + hold // 2)  # room for two holds
    headers = {"Authorization": f"Bearer {tenant.key}"}
    created = await _create_batch(http[0], tenant.key, _unserved_lines(2))
    assert created.status_code == 202, created.text
    batch_id = uuid.UUID(created.json()["id"])

    async def enriched() -> bool:  # both lines admitted (holding budget) and enriched
        n = await pool.fetchval(
            "SELECT count(*) FROM jobs WHERE batch_id = $1 AND status = 'running'", batch_id
        )
        return bool(n == 2)

    await wait_for(enriched, timeout=30, interval=0.2)
    refused = await _final(http[1], tenant.key, (await _submit(http[1], tenant.key)).json()["id"])
    assert refused["error"]["code"] == "budget_exhausted"  # the two lines hold the budget
    # As if the lines were still waiting for the enricher (admitted, not started): the
    # cancel fails them, and the budget they held must come back.
    await pool.execute("UPDATE jobs SET status = 'queued' WHERE batch_id = $1", batch_id)
    cancelled = await http[0].post(f"/v1/batches/{batch_id}/cancel", headers=headers)
    assert cancelled.status_code == 200, cancelled.text
    statuses = await pool.fetch("SELECT status FROM jobs WHERE batch_id = $1", batch_id)
    assert {row["status"] for row in statuses} == {"failed"}
    # Decided after the release: admitted.
    job = await _final(http[1], tenant.key, (await _submit(http[1], tenant.key)).json()["id"])
    assert job["status"] == "succeeded", job


async def test_budget_settles_to_actual_use(
    pool: asyncpg.Pool, http: list[httpx.AsyncClient], replicas: Replicas
) -> None:
    hold = _hold(replicas)
    budget = hold + hold // 2  # room to hold one job at a time
    tenant = await _tenant(pool, token_budget=budget)
    client, used, succeeded = http[1], 0, 0
    # One job at a time: each settles to what it used (less than it held), so the
    # budget serves more jobs than it could hold at once, until what is left cannot
    # cover one more job's most.
    while True:
        response = await _submit(client, tenant.key, text=LONG)
        if response.status_code == 402:
            assert response.json()["error"]["code"] == "budget_exhausted"
            assert "Retry-After" not in response.headers
            break
        assert response.status_code == 202, response.text
        job = await _final(client, tenant.key, response.json()["id"])
        if job["status"] == "failed":
            assert job["error"]["code"] == "budget_exhausted", job
            assert budget - used < hold
            continue  # the API refuses once the enricher's new state reaches it
        used += job["result"]["usage"]["total_tokens"]
        succeeded += 1
        assert used <= budget
    assert succeeded > 1
    assert budget - used < hold
    spent = await pool.fetchval(
        "SELECT spent FROM tenant_budget_spent WHERE tenant_id = $1", tenant.tenant_id
    )
    assert spent == used


async def test_a_job_driven_again_from_the_ledger_passes_its_tenants_limiter(
    pool: asyncpg.Pool, http: list[httpx.AsyncClient]
) -> None:
    tenant = await _tenant(pool, rpm=1)
    lost = job_request(
        MESSAGE,
        tenant_id=tenant.tenant_id,
        key_id=tenant.id,
        model="null",
        max_tokens=MAX_TOKENS,
    )
    # In the ledger but never published, and past its lease: the reconciler re-drives it.
    await ledger.admit(pool, lost, None)
    await pool.execute(
        "UPDATE jobs SET updated_at = now() - interval '1 hour' WHERE id = $1", lost.job_id
    )
    redriven = await _final(http[0], tenant.key, str(lost.job_id))
    assert redriven["status"] == "succeeded", redriven
    # Its tenant's limits decided it: it took the tenant's one request of this minute.
    response = await _submit(http[1], tenant.key)
    if response.status_code == 202:
        job = await _final(http[1], tenant.key, response.json()["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "rate_limited", job
    else:
        assert response.status_code == 429, response.text


async def _decide(
    pool: asyncpg.Pool, requests: list[JobRequest], now: float, **limits: int | None
) -> dict[uuid.UUID, enrichment.Refusal]:
    """The enricher's decision for ``requests`` at ``now`` (the deployment's default
    limits ``limits``); each must be in the ledger."""
    claims = [Claim(r.job_id, cost=reservation(r), hold=reservation(r)) for r in requests]
    defaults = Limits(limits.get("rpm"), limits.get("tpm"), limits.get("budget"))
    async with pool.acquire() as conn:
        found = await enrichment.enrich(conn, claims, now, defaults, 8, 0, 60.0)
    return found.refused


async def _requests(pool: asyncpg.Pool, tenant_id: str, n: int, **fields: Any) -> list[JobRequest]:
    """``n`` jobs of ``tenant_id`` in the ledger, each its own conversation."""
    made = []
    for _ in range(n):
        request = job_request(
            MESSAGE, **{"tenant_id": tenant_id, "model": "null", "max_tokens": MAX_TOKENS, **fields}
        )
        await ledger.admit(pool, request, None)
        made.append(request)
    return made


async def test_the_window_slides_and_says_when_to_retry(pool: asyncpg.Pool) -> None:
    tenant = (await _tenant(pool, rpm=3)).tenant_id
    start = 2_000_000_000.0
    assert await _decide(pool, await _requests(pool, tenant, 3), start) == {}
    later = await _requests(pool, tenant, 1)
    refusal = (await _decide(pool, later, start + 30))[later[0].job_id]
    assert refusal.code == "rate_limited" and refusal.status == 429
    assert refusal.retry_after_s is not None and 30 <= refusal.retry_after_s <= 31
    again = await _requests(pool, tenant, 1)  # the first three left the window
    assert await _decide(pool, again, start + 61) == {}


async def test_tokens_per_minute_count_actual_use_once_settled(pool: asyncpg.Pool) -> None:
    cost = _cost()
    tenant = (await _tenant(pool, tpm=2 * cost + 5)).tenant_id
    now = 2_100_000_000.0
    first, second, third = await _requests(pool, tenant, 3)
    assert await _decide(pool, [first, second], now) == {}
    assert third.job_id in await _decide(pool, [third], now)
    # The first job used 5 tokens: it counts that in its second of the window, not its
    # estimate. Finalised twice, it settles once.
    for _ in range(2):
        await pool.execute(
            """UPDATE jobs SET status = 'succeeded', result = '{"usage": {"total_tokens": 5}}'
            WHERE id = $1""",
            first.job_id,
        )
    [retry] = await _requests(pool, tenant, 1)
    assert await _decide(pool, [retry], now + 2) == {}
    [too_big] = await _requests(pool, tenant, 1, max_tokens=3 * cost)
    refusal = (await _decide(pool, [too_big], now + 2))[too_big.job_id]
    assert refusal.code == "rate_limited" and "lower max_tokens" in refusal.message
    assert refusal.status == 422


async def test_a_batch_line_failed_before_the_enricher_saw_it_holds_nothing(
    pool: asyncpg.Pool, http: list[httpx.AsyncClient], replicas: Replicas
) -> None:
    """A line cancelled between its insert and its enrichment: the enricher must then
    neither hold its budget nor forward it."""
    hold = _hold(replicas)
    tenant = await _tenant(pool, token_budget=hold + hold // 2)  # room to hold one job
    owner = {"tenant_id": tenant.tenant_id, "key_id": tenant.id}
    cancelled = _probe().model_copy(
        update={
            **owner,
            "conversation_id": f"line-{uuid.uuid4().hex[:8]}",
            "priority": "background",
        }
    )
    later = _probe().model_copy(
        update={**owner, "conversation_id": f"later-{uuid.uuid4().hex[:8]}"}
    )
    for request in (cancelled, later):
        await ledger.admit(pool, request, None)
    await pool.execute("UPDATE jobs SET status = 'failed' WHERE id = $1", cancelled.job_id)
    producer = create_producer(replicas.a.settings)
    await producer.start()
    try:
        await asyncio.gather(*await publish(replicas.a.settings, producer, [cancelled, later]))
    finally:
        await producer.stop()
    job = await _final(http[0], tenant.key, str(later.job_id))
    assert job["status"] == "succeeded", job  # the failed line held no budget
