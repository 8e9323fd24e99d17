"""Tenant-registered webhook endpoints: every subscribed event of the tenant's jobs and
batches reaches each of its endpoints, signed with that endpoint's own secret, and
nothing of another tenant's does."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from kontext.store import keys
from producers.backfill import create_batch
from tests.conftest import WEBHOOK_SECRETS, Stack, wait_for
from tests.receiver import Receiver, serving


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with serving() as receiver:
        yield receiver


@pytest.fixture
async def tenant(stack: Stack, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    key = await keys.create(pool, f"ep-{uuid.uuid4().hex[:8]}")
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {key.key}"}, timeout=60
    ) as http:
        yield http


other = tenant


async def _register(http: httpx.AsyncClient, url: str, events: list[str]) -> dict[str, Any]:
    response = await http.post("/v1/webhooks/endpoints", json={"url": url, "events": events})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    assert created["secret"].startswith("whsec_")
    return created


async def _job(http: httpx.AsyncClient, webhook: str | None = None) -> str:
    body: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    if webhook:
        body["webhook"] = {"url": webhook}
    response = await http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def test_endpoints_hear_their_tenants_events_signed_with_their_own_secret(
    tenant: httpx.AsyncClient, other: httpx.AsyncClient, receiver: Receiver
) -> None:
    tag = uuid.uuid4().hex[:6]
    jobs_hook, batches_hook = f"jobs-{tag}", f"batches-{tag}"
    jobs = await _register(tenant, receiver.hook(jobs_hook), ["job.*"])
    await _register(tenant, receiver.hook(batches_hook), ["batch.completed"])

    job_id = await _job(tenant)
    await wait_for(lambda: receiver.calls[jobs_hook], timeout=60)
    [call] = receiver.calls[jobs_hook]
    payload = Webhook(jobs["secret"]).verify(call.body, call.headers)
    assert payload["type"] == "job.completed" and payload["data"]["id"] == job_id
    with pytest.raises(WebhookVerificationError):  # not the deployment's secret
        Webhook(WEBHOOK_SECRETS[0]).verify(call.body, call.headers)

    # A batch: one batch.completed to the batch endpoint, nothing per line to the jobs one.
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        }
        for i in range(3)
    ]
    batch = await create_batch(tenant, b"\n".join(orjson.dumps(line) for line in lines))
    assert batch.status_code == 202, batch.text
    await wait_for(lambda: receiver.calls[batches_hook], timeout=60)
    [ended] = receiver.calls[batches_hook]
    event = orjson.loads(ended.body)
    assert event["type"] == "batch.completed" and event["data"]["id"] == batch.json()["id"]

    # Another tenant's job reaches its own webhook, never this tenant's endpoints.
    theirs = f"theirs-{tag}"
    await _job(other, receiver.hook(theirs))
    await wait_for(lambda: receiver.calls[theirs], timeout=60)
    assert len(receiver.calls[jobs_hook]) == 1

    # Listed without secrets; another tenant neither sees nor removes them.
    listed = (await tenant.get("/v1/webhooks/endpoints")).json()["data"]
    assert {e["url"] for e in listed} == {receiver.hook(jobs_hook), receiver.hook(batches_hook)}
    assert all(e["secret"] is None for e in listed)
    assert (await other.get("/v1/webhooks/endpoints")).json()["data"] == []
    assert (await other.delete(f"/v1/webhooks/endpoints/{jobs['id']}")).status_code == 404

    # Removed: the tenant's next job goes to its own webhook only.
    assert (await tenant.delete(f"/v1/webhooks/endpoints/{jobs['id']}")).status_code == 204
    own = f"own-{tag}"
    await _job(tenant, receiver.hook(own))
    await wait_for(lambda: receiver.calls[own], timeout=60)
    assert len(receiver.calls[jobs_hook]) == 1


async def test_an_endpoint_url_passes_the_ssrf_guard(tenant: httpx.AsyncClient) -> None:
    for url in ("http://169.254.169.254/latest/meta-data", "ftp://example.com/hook"):
        response = await tenant.post("/v1/webhooks/endpoints", json={"url": url})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "webhook_url_refused"
    unknown = await tenant.post(
        "/v1/webhooks/endpoints", json={"url": "http://127.0.0.1:9/x", "events": ["job.started"]}
    )
    assert unknown.status_code == 422
