"""At-least-once delivery never answers a job twice: duplicates are dropped by job id."""

from __future__ import annotations

import time
import uuid

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from producers.client import KontextClient
from schemas.events import JobCompletion, JobReply, Usage
from tests.conftest import Stack, wait_for


async def _replies_until(
    stack: Stack, start: dict[int, int], last: uuid.UUID, timeout: float
) -> list[JobReply]:
    """Replies from ``start`` on, up to and including the first reply to job ``last``."""
    topic = stack.settings.topics.replies
    consumer = AIOKafkaConsumer(
        bootstrap_servers=stack.settings.bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    found: list[JobReply] = []
    try:
        partitions = [TopicPartition(topic, p) for p in start]
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, start[tp.partition])
        deadline = time.monotonic() + timeout
        while not any(r.job_id == last for r in found) and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                found += [JobReply.decode(m.value) for m in messages]
    finally:
        await consumer.stop()
    return found


async def _ends(stack: Stack) -> dict[int, int]:
    """Where each reply partition ends now (read to the end: the broker's end offsets lag)."""
    topic = stack.settings.topics.replies
    consumer = AIOKafkaConsumer(
        bootstrap_servers=stack.settings.bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = {tp.partition: 0 for tp in partitions}
        while batches := await consumer.getmany(timeout_ms=500):
            for tp, messages in batches.items():
                ends[tp.partition] = messages[-1].offset + 1
    finally:
        await consumer.stop()
    return ends


async def test_duplicate_request_and_completion_change_nothing(
    stack: Stack, client: KontextClient, pool: asyncpg.Pool
) -> None:
    topics = stack.settings.topics
    first = await client.chat(
        model="tiny",
        messages=[{"role": "user", "content": "answer me once"}],
        max_tokens=8,
        timeout=60,
    )
    assert first.status == "succeeded" and first.result is not None
    original = first.result.choices[0].message.content
    job = await pool.fetchrow("SELECT request, attempts FROM jobs WHERE id = $1", first.job_id)
    assert job is not None and job["attempts"] == 1

    ends = await _ends(stack)
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
    await producer.start()
    key = first.conversation_id.encode()
    try:
        # The same request again, as a redelivery would bring it.
        await producer.send_and_wait(topics.requests, orjson.dumps(job["request"]), key=key)
        # And a second, different answer for the finished job.
        forged = JobCompletion(
            job_id=first.job_id,
            conversation_id=first.conversation_id,
            model="tiny",
            status="succeeded",
            output="a different answer",
            finish_reason="stop",
            usage=Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4),
        )
        await producer.send_and_wait(topics.completions, forged.encode(), key=key)
    finally:
        await producer.stop()

    # A later turn on the same partition is answered only after both duplicates went by.
    later = await client.chat(
        model="tiny",
        conversation_id=first.conversation_id,
        messages=[{"role": "user", "content": "and again"}],
        max_tokens=8,
        timeout=60,
    )
    assert later.status == "succeeded"
    # The job was answered once: the duplicates before the later turn brought no reply.
    replies = await _replies_until(stack, ends, later.job_id, timeout=30)
    assert [r.job_id for r in replies if r.job_id in (first.job_id, later.job_id)] == [later.job_id]
    after = await pool.fetchrow("SELECT attempts, result FROM jobs WHERE id = $1", first.job_id)
    assert after is not None
    assert after["attempts"] == 1  # the redelivered request was not run again
    assert after["result"]["choices"][0]["message"]["content"] == original
    turns = await pool.fetch(
        "SELECT content FROM turns WHERE conversation_id = $1 ORDER BY seq", first.conversation_id
    )
    assert [t["content"] for t in turns][:2] == ["answer me once", original]
    assert len(turns) == 4


async def test_a_reply_published_before_a_crash_is_not_published_again(
    stack: Stack, client: KontextClient, pool: asyncpg.Pool
) -> None:
    """A recorder published a batch's replies and died before committing its offsets or
    remembering them: the batch comes again to the next recorder, which finds the
    replies already on the reply topic and does not send them twice."""
    first = await client.chat(
        model="tiny", messages=[{"role": "user", "content": "reply once"}], max_tokens=8, timeout=60
    )
    assert first.status == "succeeded" and first.result is not None

    async def remembered() -> bool:
        at = await pool.fetchval("SELECT replied_at FROM jobs WHERE id = $1", first.job_id)
        return at is not None

    await wait_for(remembered, timeout=30)
    # The state such a crash leaves: final, its reply on the topic, not remembered.
    await pool.execute("UPDATE jobs SET replied_at = NULL WHERE id = $1", first.job_id)
    ends = await _ends(stack)
    again = JobCompletion(
        job_id=first.job_id,
        conversation_id=first.conversation_id,
        model="tiny",
        status="succeeded",
        output=first.result.choices[0].message.content,
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4),
    )
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            stack.settings.topics.completions, again.encode(), key=first.conversation_id.encode()
        )
    finally:
        await producer.stop()
    later = await client.chat(
        model="tiny",
        conversation_id=first.conversation_id,
        messages=[{"role": "user", "content": "and now"}],
        max_tokens=8,
        timeout=60,
    )
    assert later.status == "succeeded"
    replies = await _replies_until(stack, ends, later.job_id, timeout=30)
    assert [r.job_id for r in replies if r.job_id in (first.job_id, later.job_id)] == [later.job_id]
    await wait_for(remembered, timeout=30)  # and the redelivery remembered it
