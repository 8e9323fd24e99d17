"""Secrets never reach the logs or the topics: the database password, webhook
secrets (the deployment's and a job's own), API keys (a valid one, a wrong one).
The dev key is printed once, on the line that announces it, and nowhere else.
A job's own webhook secret stays in Postgres on every path a request takes onto
a topic: submission, a turn released behind the one before it, a re-drive."""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from standardwebhooks import Webhook

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.store import ledger
from producers.client import KontextClient
from schemas.events import JobWebhook
from tests.conftest import WEBHOOK_SECRETS, Stack, stack_env, start_stack, wait_for
from tests.factories import job_request
from tests.receiver import Receiver, serving


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with serving() as receiver:
        yield receiver


async def _topic_bytes(stack: Stack) -> bytes:
    """Everything on this deployment's topics so far: read until nothing but heartbeats
    (published every second, for ever) came for two seconds."""
    topics = stack.settings.topics
    consumer = AIOKafkaConsumer(
        *topics.all(["tiny", "smollm2"]),
        bootstrap_servers=stack.settings.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        seen = b""
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 2:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, messages in batch.items():
                seen += b"".join((m.key or b"") + (m.value or b"") for m in messages)
                if messages and tp.topic != topics.heartbeats:
                    quiet_since = time.monotonic()
        return seen
    finally:
        await consumer.stop()


async def _role_with_password(database: EmbeddedPostgres) -> tuple[str, str]:
    """A login role with a password, and DATABASE_URL for it."""
    password = f"pw-{secrets.token_hex(12)}"
    role = f"kx_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database.url)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
    finally:
        await conn.close()
    return password, database.url.replace("postgres@", f"{role}:{password}@", 1)


async def test_no_secret_is_logged_or_published(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path, receiver: Receiver
) -> None:
    password, url = await _role_with_password(database)
    env = stack_env(broker, database, prefix=f"s{uuid.uuid4().hex[:8]}")
    env["DATABASE_URL"] = url
    stack = start_stack(["up", "--engine", "tiny", "--port", "0", "--verbose"], env, workdir)
    job_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    wrong_key = "kx_" + secrets.token_urlsafe(24)
    try:
        receiver.failures["secret-test"] = 2  # failed attempts are logged: still no secret
        async with httpx.AsyncClient(
            base_url=stack.api_url, headers=stack.headers, timeout=60
        ) as http:
            refused = await http.get(
                f"/v1/jobs/{uuid.uuid4()}", headers={"Authorization": f"Bearer {wrong_key}"}
            )
            assert refused.status_code == 401
            submitted = await http.post(
                "/v1/jobs",
                json={
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "keep it secret"}],
                    "webhook": {"url": receiver.hook("secret-test"), "secret": job_secret},
                },
            )
            assert submitted.status_code == 202, submitted.text
        await wait_for(lambda: len(receiver.calls["secret-test"]) >= 3, timeout=60)
        published = await _topic_bytes(stack)
    finally:
        assert stack.stop() == 0
    logged = "".join(stack.output)
    assert stack.api_key and logged.count(stack.api_key) == 1
    for secret in (password, job_secret, wrong_key, *WEBHOOK_SECRETS):
        assert secret not in logged
        assert secret.encode() not in published
        assert secret.removeprefix("whsec_") not in logged


def _new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


async def test_a_job_secret_stays_off_every_topic_on_every_path(
    stack: Stack, client: KontextClient, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    job_secret = _new_secret()
    hook = f"secret-paths-{uuid.uuid4().hex[:6]}"
    webhook = {"url": receiver.hook(hook), "secret": job_secret}
    conversation = f"secret-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers, timeout=60) as http:
        # Back to back: the later turns wait behind the first and are released by the
        # recorder, which publishes their stored requests again.
        submitted = [
            await http.post(
                "/v1/jobs",
                json={
                    "model": "tiny",
                    "conversation_id": conversation,
                    "messages": [{"role": "user", "content": f"turn {n}"}],
                    "max_tokens": 4,
                    "webhook": webhook,
                },
            )
            for n in (1, 2, 3)
        ]
    assert [r.status_code for r in submitted] == [202, 202, 202], [r.text for r in submitted]
    # A job whose message was lost: in the ledger with its secret, never published and
    # past its lease, so the reconciler publishes its stored request.
    lost = job_request(
        "was my message lost?", webhook=JobWebhook(url=receiver.hook(hook)), tenant_id="default"
    )
    await ledger.admit(pool, lost, None, webhook_secret=job_secret)
    await pool.execute(
        "UPDATE jobs SET updated_at = now() - interval '1 hour' WHERE id = $1", lost.job_id
    )
    for job_id in [uuid.UUID(r.json()["id"]) for r in submitted] + [lost.job_id]:
        assert (await client.result(job_id, timeout=60)).status == "succeeded"
    await wait_for(lambda: len(receiver.calls[hook]) >= 4, timeout=60)
    # Every delivery is signed with the job's own secret, kept in the ledger.
    calls = receiver.calls[hook]
    delivered = {Webhook(job_secret).verify(c.body, c.headers)["data"]["id"] for c in calls}
    assert str(lost.job_id) in delivered and len(delivered) == 4
    stored = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE request::text LIKE '%' || $1 || '%'",
        job_secret.removeprefix("whsec_"),
    )
    assert stored == 0, "the secret is in a stored request"
    published = await _topic_bytes(stack)
    assert job_secret.removeprefix("whsec_").encode() not in published
