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


def _completion(job: JobReply, output: str) -> JobCompletion:
    """A completion for the finished ``job``, as a redelivery (or a forger) would bring it."""
    return JobCompletion(
        job_id=job.job_id,
        conversation_id=job.conversation_id,
        model="tiny",
        status="succeeded",
        output=output,
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4),
    )


async def _send(stack: Stack, key: str, records: list[tuple[str, bytes]]) -> None:
    """Publish (topic, value) records keyed by conversation ``key``, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
    await producer.start()
    try:
        for topic, value in records:
            await producer.send_and_wait(topic, value, key=key.encode())
    finally:
        await producer.stop()


async def _replied_before_next_turn(
    stack: Stack, client: KontextClient, first: JobReply, ends: dict[int, int], content: str
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """Send the conversation's next turn (on the same partition, so it is answered only
    after what was sent before it); its job id, and the job ids of the replies to
    ``first`` and to it since ``ends``, in order."""
    later = await client.chat(
        model="tiny",
        conversation_id=first.conversation_id,
        messages=[{"role": "user", "content": content}],
        max_tokens=8,
        timeout=60,
    )
    assert later.status == "succeeded"
    replies = await _replies_until(stack, ends, later.job_id, timeout=30)
    return later.job_id, [r.job_id for r in replies if r.job_id in (first.job_id, later.job_id)]


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
    # The same request again, as a redelivery would bring it, and a second, different
    # answer for the finished job.
    forged = _completion(first, "a different answer")
    await _send(
        stack,
        first.conversation_id,
        [(topics.requests, orjson.dumps(job["request"])), (topics.completions, forged.encode())],
    )
    # The job was answered once: the duplicates before the later turn brought no reply.
    later, replied = await _replied_before_next_turn(stack, client, first, ends, "and again")
    assert replied == [later]
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
    again = _completion(first, first.result.choices[0].message.content)
    await _send(stack, first.conversation_id, [(stack.settings.topics.completions, again.encode())])
    later, replied = await _replied_before_next_turn(stack, client, first, ends, "and now")
    assert replied == [later]
    await wait_for(remembered, timeout=30)  # and the redelivery remembered it
