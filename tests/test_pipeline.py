"""End to end through the real broker, Postgres and models: HTTP in, reply topic out."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from kontext.app.embedded import EmbeddedBroker
from kontext.connections import ensure_topics
from kontext.settings import Settings
from kontext.store import ledger
from producers.client import KontextClient
from tests.conftest import Stack
from tests.factories import job_request
from workers.intake import EnqueueFailed, enqueue


async def test_job_travels_from_http_to_reply_topic_and_ledger(
    stack: Stack, client: KontextClient, pool: asyncpg.Pool
) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        response = await http.post(
            "/v1/jobs",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hello there"}]},
        )
        assert response.status_code == 202
        accepted = response.json()
        assert accepted["status"] == "queued"
        assert accepted["conversation_id"]
        job_id = uuid.UUID(accepted["id"])

        reply = await client.result(job_id, timeout=60)
        assert reply.status == "succeeded"
        assert reply.conversation_id == accepted["conversation_id"]

        view = (await http.get(f"/v1/jobs/{job_id}")).json()
    assert view["status"] == "succeeded"
    completion = view["result"]
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "tiny"
    message = completion["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == reply.result.choices[0].message.content  # type: ignore[union-attr]
    usage = completion["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    turns = await pool.fetch(
        "SELECT seq, role, content, job_id FROM turns WHERE conversation_id = $1 ORDER BY seq",
        accepted["conversation_id"],
    )
    assert [(t["seq"], t["role"]) for t in turns] == [(1, "user"), (2, "assistant")]
    assert turns[0]["content"] == "hello there"
    assert turns[1]["content"] == message["content"]
    assert all(t["job_id"] == job_id for t in turns)


async def test_second_turn_prompt_carries_the_first_exchange(client: KontextClient) -> None:
    first = await client.chat(
        model="tiny",
        messages=[{"role": "user", "content": "My locker code is 4417."}],
        timeout=60,
    )
    assert first.status == "succeeded" and first.result is not None
    first_answer = first.result.choices[0].message.content

    second = await client.chat(
        model="tiny",
        conversation_id=first.conversation_id,
        messages=[{"role": "user", "content": "What is my locker code?"}],
        include_prompt=True,
        timeout=60,
    )
    assert second.status == "succeeded" and second.result is not None
    context = second.result.context
    assert context is not None and context.prompt is not None
    prompt = context.prompt
    assert "My locker code is 4417." in prompt
    assert first_answer in prompt
    assert prompt.index("4417") < prompt.index("What is my locker code?")
    assert context.turns == [1, 2]
    assert context.prompt_tokens == second.result.usage.prompt_tokens
    # Without include_prompt the prompt is not echoed back.
    assert first.result.context is not None and first.result.context.prompt is None


async def test_same_idempotency_key_returns_the_same_job(
    stack: Stack, client: KontextClient, pool: asyncpg.Pool
) -> None:
    key = f"idem-{uuid.uuid4()}"
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "only once please"}],
        "idempotency_key": key,
    }
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        first = await http.post("/v1/jobs", json=body)
        second = await http.post("/v1/jobs", json=body)
        other = {**body, "messages": [{"role": "user", "content": "something else"}]}
        reused = await http.post("/v1/jobs", json=other)
    assert first.status_code == 202
    assert second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert reused.status_code == 409, reused.text
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert first.json()["id"] in reused.json()["error"]["message"]
    job_id = uuid.UUID(first.json()["id"])
    reply = await client.result(job_id, timeout=60)
    assert reply.status == "succeeded"
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE idempotency_key = $1", key) == 1
    turns = await pool.fetchval(
        "SELECT count(*) FROM turns WHERE conversation_id = $1", reply.conversation_id
    )
    assert turns == 2


async def test_smollm2_answers_a_real_question(client: KontextClient) -> None:
    reply = await client.chat(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        timeout=120,
    )
    assert reply.status == "succeeded" and reply.result is not None
    assert "paris" in reply.result.choices[0].message.content.lower()


async def test_an_oversized_message_is_cut_with_a_marker(client: KontextClient) -> None:
    reply = await client.chat(
        model="tiny",
        messages=[{"role": "user", "content": "a" * 3000 + "z" * 3000}],
        include_prompt=True,
        timeout=60,
    )
    assert reply.status == "succeeded" and reply.result is not None
    context = reply.result.context
    assert context is not None and context.prompt is not None
    assert context.truncated
    assert "[…truncated to fit the context window…]" in context.prompt
    assert context.budget_tokens is not None
    assert context.prompt_tokens <= context.budget_tokens
    # The head and the tail of the message both survive the cut.
    assert "aaaa" in context.prompt and "zzzz" in context.prompt


async def test_a_prompt_that_cannot_fit_fails_the_job_with_a_reason(client: KontextClient) -> None:
    reply = await client.chat(
        model="tiny",
        messages=[
            {"role": "system", "content": "Be brief. " * 200},
            {"role": "user", "content": "hello"},
        ],
        timeout=60,
    )
    assert reply.status == "failed"
    assert reply.error is not None
    assert reply.error.code == "prompt_too_long"
    assert "tokens" in reply.error.message


async def test_a_job_that_could_not_be_queued_leaves_its_idempotency_key_free(
    tmp_path: Path, broker: EmbeddedBroker, pool: asyncpg.Pool
) -> None:
    """The broker is gone: the job fails as ``enqueue_failed`` (503 at the API), and a
    retry with the same key, once the broker is back, runs as a new job."""
    key = f"unqueued-{uuid.uuid4().hex}"
    admitter = ledger.Admitter(pool)
    gone = EmbeddedBroker(log_path=tmp_path / "gone.log").start()
    lost = Settings(kafka_bootstrap_servers=gone.bootstrap_servers, topic_prefix="gone")
    producer = AIOKafkaProducer(bootstrap_servers=lost.bootstrap, request_timeout_ms=2000)
    await producer.start()
    gone.stop()
    first = job_request("queue me")
    try:
        with pytest.raises(EnqueueFailed):
            await enqueue(lost, admitter, producer, first, key)
    finally:
        await producer.stop()
    failed = await ledger.get(pool, first.job_id)
    assert failed is not None and failed.status == "failed"
    assert failed.error is not None and failed.error["code"] == "enqueue_failed"

    back = Settings(kafka_bootstrap_servers=broker.bootstrap_servers, topic_prefix="back")
    await ensure_topics(back, [back.topics.requests])
    producer = AIOKafkaProducer(bootstrap_servers=back.bootstrap)
    await producer.start()
    try:
        retried = job_request("queue me")
        job, created = await enqueue(back, admitter, producer, retried, key)
    finally:
        await producer.stop()
    assert created and job.id == retried.job_id and job.status == "queued"
