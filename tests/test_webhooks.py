"""Webhooks end to end, against a real local HTTP receiver.

The stack signs with two deployment secrets (a rotation), allow-lists
127.0.0.1 and retries on a short schedule (0, 0.2, 0.2 s: three attempts).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from standardwebhooks import Webhook, WebhookVerificationError

from kontext.app.embedded import EmbeddedPostgres
from kontext.ssrf import UrlGuard
from kontext.store.deliveries import Delivery
from schemas.api import JobView
from schemas.events import JobReply, JobRequest
from tests.conftest import WEBHOOK_SECRETS, Stack, wait_for
from tests.receiver import Receiver, serving
from workers.retries import RetryPolicy
from workers.sender import Sender

JOB_SECRET = "whsec_a29udGV4dC10ZXN0LXNlY3JldC1vZi1vbmUtam9iISE="


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with serving() as receiver:
        yield receiver


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=stack.headers, timeout=30
    ) as client:
        yield client


def _name(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


async def _submit(http: httpx.AsyncClient, webhook: dict[str, str], **extra: Any) -> str:
    response = await http.post(
        "/v1/jobs",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 8,
            "webhook": webhook,
            **extra,
        },
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def _deliveries(http: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    response = await http.get("/v1/webhooks/deliveries", params=params)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def _wait_delivery(
    http: httpx.AsyncClient, job_id: str, status: str, attempts: int, timeout: float = 60
) -> dict[str, Any]:
    """The job's delivery once it has this status and this many logged attempts."""
    found: dict[str, Any] = {}

    async def reached() -> bool:
        for delivery in await _deliveries(http, job_id=job_id):
            if delivery["status"] == status and len(delivery["attempts"]) == attempts:
                found.update(delivery)
                return True
        return False

    await wait_for(reached, timeout=timeout, interval=0.1)
    return found


async def test_delivery_is_signed_under_the_standard_webhooks_spec(
    http: httpx.AsyncClient, receiver: Receiver
) -> None:
    name = _name("signed")
    job_id = await _submit(http, {"url": receiver.hook(name)})
    delivery = await _wait_delivery(http, job_id, "delivered", attempts=1)
    assert delivery["event_type"] == "job.completed"
    assert delivery["attempts"][0]["status_code"] == 204
    assert delivery["attempts"][0]["error"] is None
    assert "secret" not in delivery

    [call] = receiver.calls[name]
    headers = {k.lower(): v for k, v in call.headers.items()}
    assert headers["webhook-id"] == delivery["id"]
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert headers["content-type"] == "application/json"
    # Signed with both deployment secrets during the rotation: either one verifies.
    assert len(headers["webhook-signature"].split(" ")) == 2
    payloads = [Webhook(secret).verify(call.body, call.headers) for secret in WEBHOOK_SECRETS]
    assert payloads[0] == payloads[1]
    payload = payloads[0]
    assert payload["type"] == "job.completed"
    assert payload["timestamp"]
    view = JobView.model_validate((await http.get(f"/v1/jobs/{job_id}")).json())
    assert JobView.model_validate(payload["data"]) == view
    assert view.status == "succeeded"


async def test_a_job_secret_signs_its_own_webhook(
    stack: Stack, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    name = _name("own-secret")
    job_id = await _submit(http, {"url": receiver.hook(name), "secret": JOB_SECRET})
    await _wait_delivery(http, job_id, "delivered", attempts=1)
    [call] = receiver.calls[name]
    assert Webhook(JOB_SECRET).verify(call.body, call.headers)["data"]["id"] == job_id
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRETS[0]).verify(call.body, call.headers)
    # The secret stays in the ledger: the published request carries the URL alone.
    raw = await _published_request(stack, job_id)
    published = JobRequest.decode(raw)
    assert published.webhook is not None and published.webhook.url == receiver.hook(name)
    assert JOB_SECRET.removeprefix("whsec_").encode() not in raw


async def _published_request(stack: Stack, job_id: str) -> bytes:
    consumer = AIOKafkaConsumer(
        stack.settings.topics.requests,
        bootstrap_servers=stack.settings.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for message in messages:
                    if message.value is not None and job_id.encode() in message.value:
                        return message.value
    finally:
        await consumer.stop()
    raise AssertionError(f"job {job_id} not found on the requests topic")


async def test_failing_receiver_recovers_and_gets_the_event_once_more_with_the_same_id(
    stack: Stack, http: httpx.AsyncClient, receiver: Receiver, pool: asyncpg.Pool
) -> None:
    name = _name("flaky")
    receiver.failures[name] = 2
    conversation = _name("conv")
    job_id = await _submit(http, {"url": receiver.hook(name)}, conversation_id=conversation)
    delivery = await _wait_delivery(http, job_id, "delivered", attempts=3)

    attempts = delivery["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status_code"] for a in attempts] == [503, 503, 204]
    assert [a["error"] for a in attempts] == ["HTTP 503: receiver down"] * 2 + [None]
    assert all(a["latency_ms"] >= 0 and a["attempted_at"] for a in attempts)
    calls = receiver.calls[name]
    assert len(calls) == 3
    assert {c.headers["webhook-id"] for c in calls} == {delivery["id"]}
    for call in calls:
        Webhook(WEBHOOK_SECRETS[1]).verify(call.body, call.headers)

    # The reply arrives again (at-least-once): no second delivery, no further call.
    view = (await http.get(f"/v1/jobs/{job_id}")).json()
    duplicate = JobReply(
        job_id=uuid.UUID(job_id), conversation_id=conversation, status=view["status"]
    )
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            stack.settings.topics.replies, duplicate.encode(), key=conversation.encode()
        )
    finally:
        await producer.stop()
    # A later job of the same conversation replies on the same partition, after the duplicate.
    marker = _name("marker")
    later = await _submit(http, {"url": receiver.hook(marker)}, conversation_id=conversation)
    await _wait_delivery(http, later, "delivered", attempts=1)
    assert len(receiver.calls[name]) == 3
    count = await pool.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE job_id = $1", uuid.UUID(job_id)
    )
    assert count == 1


async def _cli(database: EmbeddedPostgres, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontext.cli",
        "webhooks",
        *args,
        env={"DATABASE_URL": database.url, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_permanent_failure_goes_dead_then_redelivery_works(
    http: httpx.AsyncClient, receiver: Receiver, database: EmbeddedPostgres
) -> None:
    name = _name("down")
    receiver.failures[name] = -1
    job_id = await _submit(http, {"url": receiver.hook(name)})
    dead = await _wait_delivery(http, job_id, "dead", attempts=3)
    assert [a["status_code"] for a in dead["attempts"]] == [503, 503, 503]
    assert dead["next_attempt_at"] is None
    assert dead["last_error"] == "HTTP 503: receiver down"
    assert dead["id"] in {d["id"] for d in await _deliveries(http, status="dead")}
    assert dead["id"] not in {d["id"] for d in await _deliveries(http, status="delivered")}

    # Redelivered while the receiver is still down: a fresh schedule, dead again.
    response = await http.post(f"/v1/webhooks/deliveries/{dead['id']}/redeliver")
    assert response.status_code == 202, response.text
    again = await _wait_delivery(http, job_id, "dead", attempts=6)
    assert [a["attempt"] for a in again["attempts"]] == [1, 2, 3, 4, 5, 6]

    # The receiver is back; the CLI redelivers.
    receiver.failures[name] = 0
    code, output = await _cli(database, "redeliver", dead["id"])
    assert code == 0, output
    delivered = await _wait_delivery(http, job_id, "delivered", attempts=7)
    assert delivered["attempts"][-1]["status_code"] == 204
    assert delivered["delivered_at"] is not None
    calls = receiver.calls[name]
    assert len(calls) == 7
    assert {c.headers["webhook-id"] for c in calls} == {dead["id"]}

    code, output = await _cli(database, "list", "--job-id", job_id)
    assert code == 0, output
    listed = orjson.loads(output.strip().splitlines()[-1])
    assert listed["id"] == dead["id"] and listed["status"] == "delivered"


async def test_redeliver_unknown_delivery_is_404(http: httpx.AsyncClient) -> None:
    response = await http.post(f"/v1/webhooks/deliveries/{uuid.uuid4()}/redeliver")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    response = await http.get("/v1/webhooks/deliveries", params={"status": "lost"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://10.0.0.5/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[::1]:8080/hook", "loopback"),
        ("file:///etc/passwd", "http or https"),
        ("ftp://127.0.0.1/hook", "http or https"),
    ],
)
async def test_refused_webhook_urls_get_422_and_store_nothing(
    http: httpx.AsyncClient, pool: asyncpg.Pool, url: str, reason: str
) -> None:
    key = _name("refused")
    response = await http.post(
        "/v1/jobs",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "webhook": {"url": url},
            "idempotency_key": key,
        },
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "webhook_url_refused"
    assert reason in error["message"]
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE idempotency_key = $1", key) == 0


async def test_a_malformed_secret_is_refused_and_not_echoed(http: httpx.AsyncClient) -> None:
    secret = "whsec_c2hvcnQ="
    response = await http.post(
        "/v1/jobs",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "webhook": {"url": "https://93.184.215.14/hook", "secret": secret},
        },
    )
    assert response.status_code == 422
    assert "webhook.secret" in response.text
    assert secret not in response.text
    assert "c2hvcnQ" not in response.text


def _sender(allow: list[str]) -> Sender:
    return Sender(
        UrlGuard(allow), WEBHOOK_SECRETS, RetryPolicy([0, 1]), timeout_s=3, max_connections=4
    )


def _delivery(url: str) -> Delivery:
    return Delivery(
        id=uuid.uuid4(),
        job_id=uuid.uuid4(),
        url=url,
        secret=None,
        payload={"type": "job.completed", "data": {}},
        attempt=1,
        cycle_attempt=1,
    )


async def test_delivery_time_guard_refuses_before_connecting(receiver: Receiver) -> None:
    name = _name("guarded")
    refused_sender = _sender([])
    try:
        attempt = await refused_sender.attempt(_delivery(receiver.hook(name)))
    finally:
        await refused_sender.close()
    assert attempt.status_code is None
    assert attempt.error is not None and "loopback" in attempt.error
    assert attempt.retry_in_s == 1
    assert receiver.calls[name] == []

    admitted = _sender(["127.0.0.0/8"])
    try:
        attempt = await admitted.attempt(_delivery(receiver.hook(name)))
    finally:
        await admitted.close()
    assert (attempt.status_code, attempt.error) == (204, None)
    assert len(receiver.calls[name]) == 1


async def test_redirects_are_not_followed(receiver: Receiver) -> None:
    name = _name("redirect")
    sender = _sender(["127.0.0.1"])
    try:
        attempt = await sender.attempt(_delivery(receiver.hook(name)))
    finally:
        await sender.close()
    assert attempt.status_code == 302
    assert attempt.error is not None and attempt.error.startswith("HTTP 302")
    assert receiver.calls["elsewhere"] == []
