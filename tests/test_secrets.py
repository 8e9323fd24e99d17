"""Secrets never reach the logs or the topics: the database password, webhook
secrets (the deployment's and a job's own), API keys (a valid one, a wrong one).
The dev key is printed once, on the line that announces it, and nowhere else."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from kontext.embedded import EmbeddedBroker, EmbeddedPostgres
from tests.conftest import WEBHOOK_SECRETS, Stack, stack_env, start_stack, wait_for
from tests.receiver import Receiver, serving


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with serving() as receiver:
        yield receiver


async def _topic_bytes(stack: Stack) -> bytes:
    """Everything on this deployment's topics so far."""
    topics = stack.settings.topics.all(["tiny"])
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=stack.settings.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        seen = b""
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                return seen
            for messages in batch.values():
                seen += b"".join((m.key or b"") + (m.value or b"") for m in messages)
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
