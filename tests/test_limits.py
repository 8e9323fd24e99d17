"""Per-tenant rate limits and token budgets across two API replicas.

One ``kontext up`` (API replica A, the admission stage and every worker, null
engine) and a second API-only process (replica B) share the broker and the
database. Concurrent submitters on both replicas must not push a tenant past
its limit or budget by even one job.
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
from aiokafka import AIOKafkaProducer

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.chaos.scenarios import dead_letters
from kontext.settings import Settings
from kontext.store import keys, ledger
from schemas.events import JobRequest
from schemas.limits import ADMISSION_EVENT, Settled, SubmittedMany
from tests.conftest import Stack, stack_env, start_stack, wait_for
from tests.factories import job_request
from workers.intake import admission_events
from workers.policies.limits import (
    LimitLedger,
    TenantLimits,
    budget_reservation,
    reservation,
)

RPM = 10
MAX_TOKENS = 40
BURST_JOBS = 5
MESSAGE = "How many tokens will this use?"
LONG = " ".join(["word"] * 120)
UNSERVED = "tiny"
"""Served (accepted, enriched) but no inference worker runs it in this module."""
LIMITS_REFRESH_S = 0.5


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
        KONTEXT_LIMITS_REFRESH_S=str(LIMITS_REFRESH_S),
        KONTEXT_POLICY_LIMITS="true",
        # A batch's lines reach the limiter in several chunks, each split over two events.
        KONTEXT_BACKFILL_CHUNK_SIZE="4",
        KONTEXT_ADMISSION_EVENT_MAX_BYTES="2048",
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
    """A new tenant with ``limits`` (rpm, tpm, token_budget), and its API key. Used at
    once: the limiter reads a tenant it has not seen before deciding its first job."""
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

    # Once the limiter has published the full window, both replicas refuse at once,
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
    headers = {"Authorization": f"Bearer {tenant.key}", "content-type": "application/jsonl"}
    # No worker runs UNSERVED: admitted lines keep their hold.
    created = await http[0].post("/v1/batches", content=_unserved_lines(10), headers=headers)
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
    errors = await http[0].get(f"/v1/batches/{batch_id}/errors", headers=headers)
    refused = [orjson.loads(line) for line in errors.text.splitlines() if line]
    assert {line["error"]["code"] for line in refused} == {"budget_exhausted"}
    # The lines arrive in chunks of several events each, and are decided in line order:
    # the first three hold the budget, every later one is refused, each exactly once.
    assert sorted(line["custom_id"] for line in refused) == [f"line-{i}" for i in range(3, 10)]
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
    headers = {"Authorization": f"Bearer {tenant.key}", "content-type": "application/jsonl"}
    created = await http[0].post("/v1/batches", content=_unserved_lines(2), headers=headers)
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
    # Decided after the release (the tenant's events are read in order): admitted.
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
            continue  # the API refuses once the limiter's new state reaches it
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
    # It went through the limiter: it took the tenant's one request of this minute.
    response = await _submit(http[1], tenant.key)
    if response.status_code == 202:
        job = await _final(http[1], tenant.key, response.json()["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "rate_limited", job
    else:
        assert response.status_code == 429, response.text


def _ledger(**limits: int | None) -> LimitLedger:
    settings = Settings(
        default_rpm=limits.get("rpm"),
        default_tpm=limits.get("tpm"),
        default_token_budget=limits.get("budget"),
    )
    return LimitLedger(TenantLimits(settings, None), {})


def _request(max_tokens: int = MAX_TOKENS) -> JobRequest:
    return job_request(
        MESSAGE, conversation_id="c", tenant_id="t", model="null", max_tokens=max_tokens
    )


async def test_the_window_slides_and_says_when_to_retry() -> None:
    ledger, start = _ledger(rpm=3), 1_000_000.0
    assert await ledger.admit([_request() for _ in range(3)], start) == {}
    later = [_request()]
    refusal = (await ledger.admit(later, start + 30))[later[0].job_id]
    assert refusal.code == "rate_limited"
    assert refusal.retry_after_s is not None and 30 <= refusal.retry_after_s <= 31
    assert ledger.status("t", start + 30).blocked_until == start + 61
    assert await ledger.admit(later, start + 61) == {}  # the first three left the window


async def test_tokens_per_minute_count_actual_use_once_settled() -> None:
    cost = _cost()
    ledger, now = _ledger(tpm=2 * cost + 5), 1_000_000.0
    first, second, third = _request(), _request(), _request()
    assert await ledger.admit([first, second], now) == {}
    assert third.job_id in await ledger.admit([third], now)
    ledger.settle([Settled(job_id=first.job_id, tenant_id="t", tokens=5)], now + 1)
    ledger.settle([Settled(job_id=first.job_id, tenant_id="t", tokens=5)], now + 1)  # again
    assert await ledger.admit([third], now + 2) == {}
    too_big = _request(max_tokens=3 * cost)
    refusal = (await ledger.admit([too_big], now + 2))[too_big.job_id]
    assert refusal.code == "rate_limited" and "lower max_tokens" in refusal.message


async def test_a_malformed_batch_chunk_is_dead_lettered_whole(
    pool: asyncpg.Pool, http: list[httpx.AsyncClient], replicas: Replicas
) -> None:
    # Room to hold one job: had the chunk's good line been admitted (its model has no
    # worker, so it would hold budget for good), the later job would be refused.
    hold = _hold(replicas)
    tenant = await _tenant(pool, token_budget=hold + hold // 2)
    good = _probe().model_copy(
        update={"tenant_id": tenant.tenant_id, "model": UNSERVED, "priority": "background"}
    )
    bad = orjson.dumps(
        {
            "version": 1,
            "type": "submitted_many",
            "requests": [orjson.loads(good.encode()), {"job_id": "not a job"}],
        }
    )
    later = _probe().model_copy(
        update={
            "tenant_id": tenant.tenant_id,
            "key_id": tenant.id,
            "conversation_id": f"later-{uuid.uuid4().hex[:8]}",
        }
    )
    await ledger.admit(pool, later, None)
    settings = replicas.a.settings
    topics = settings.topics
    key = tenant.tenant_id.encode()
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topics.admission, bad, key=key)
        # After it in the tenant's partition, so decided after it.
        await producer.send_and_wait(
            topics.admission, SubmittedMany(requests=[later]).encode(), key=key
        )
    finally:
        await producer.stop()

    [letter] = await dead_letters(settings.bootstrap, topics.dead_letters, key, want=1)
    assert letter.consumer == "admission" and letter.source_topic == topics.admission
    assert letter.value == bad and letter.reason.startswith("invalid admission event")
    job = await _final(http[0], tenant.key, str(later.job_id))
    assert job["status"] == "succeeded", job


async def test_a_batch_line_failed_before_its_chunk_reaches_the_limiter_holds_nothing(
    pool: asyncpg.Pool, http: list[httpx.AsyncClient], replicas: Replicas
) -> None:
    """A cancel between a chunk's insert and its publish releases the lines before the
    limiter sees them: it must then neither hold their budget nor forward them."""
    hold = _hold(replicas)
    tenant = await _tenant(pool, token_budget=hold + hold // 2)  # room to hold one job
    owner = {"tenant_id": tenant.tenant_id, "key_id": tenant.id}
    cancelled = _probe().model_copy(
        update={**owner, "conversation_id": f"line-{uuid.uuid4().hex[:8]}"}
    )
    later = _probe().model_copy(
        update={**owner, "conversation_id": f"later-{uuid.uuid4().hex[:8]}"}
    )
    for request in (cancelled, later):
        await ledger.admit(pool, request, None)
    await pool.execute("UPDATE jobs SET status = 'failed' WHERE id = $1", cancelled.job_id)
    topics = replicas.a.settings.topics
    key = tenant.tenant_id.encode()
    producer = AIOKafkaProducer(bootstrap_servers=replicas.a.settings.bootstrap)
    await producer.start()
    try:
        line = cancelled.model_copy(update={"priority": "background"})
        await producer.send_and_wait(
            topics.admission, SubmittedMany(requests=[line]).encode(), key=key
        )
        await producer.send_and_wait(  # decided after it (same partition)
            topics.admission, SubmittedMany(requests=[later]).encode(), key=key
        )
    finally:
        await producer.stop()
    job = await _final(http[0], tenant.key, str(later.job_id))
    assert job["status"] == "succeeded", job  # the failed line held no budget


def test_a_chunk_goes_to_admission_in_events_under_the_size_limit() -> None:
    requests = [
        _probe("x" * (40 * i)).model_copy(update={"priority": "background"}) for i in range(50)
    ]
    limit = 4096
    events = admission_events(requests, limit)
    assert 1 < len(events) < len(requests)
    assert all(len(event) <= limit for event in events)
    decoded = [ADMISSION_EVENT.validate_json(event) for event in events]
    assert all(isinstance(event, SubmittedMany) for event in decoded)
    assert [r for e in decoded if isinstance(e, SubmittedMany) for r in e.requests] == requests
    # A line larger than the limit goes alone; a default-sized chunk of ordinary lines
    # goes whole.
    huge = _probe("y" * 2 * limit)
    alone = [
        SubmittedMany.model_validate_json(e)
        for e in admission_events([requests[0], huge, requests[1]], limit)
    ]
    assert [e.requests for e in alone] == [[requests[0]], [huge], [requests[1]]]
    assert len(admission_events([requests[1]] * 500, Settings().admission_event_max_bytes)) == 1
