"""Messages that do not parse go to the dead-letter topic; consumers keep going."""

from __future__ import annotations

import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from producers.client import KontextClient
from schemas.events import DeadLetter, ErrorInfo, JobCompletion, Usage
from tests.conftest import Stack


async def _dead_letters(
    stack: Stack, marker: bytes, expected: int, timeout: float
) -> list[DeadLetter]:
    consumer = AIOKafkaConsumer(
        stack.settings.topics.dead_letters,
        bootstrap_servers=stack.settings.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[DeadLetter] = []
    try:
        deadline = time.monotonic() + timeout
        while len(found) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                for message in messages:
                    letter = DeadLetter.decode(message.value)
                    if letter.value is not None and marker in letter.value:
                        found.append(letter)
    finally:
        await consumer.stop()
    return found


async def test_poison_messages_are_dead_lettered_and_good_ones_still_answered(
    stack: Stack, client: KontextClient
) -> None:
    topics = stack.settings.topics
    marker = uuid.uuid4().hex.encode()
    poison = {
        topics.requests: b"\xff\xfenot json " + marker,
        topics.inference("tiny"): b'{"version": 1, "prompt": 7, "m": "' + marker + b'"}',
        topics.completions: b'{"version": 99, "job_id": "' + marker + b'"}',
    }
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
    await producer.start()
    try:
        for topic, value in poison.items():
            await producer.send_and_wait(topic, value, key=b"poison")
    finally:
        await producer.stop()

    # A good job submitted after the poison is still answered.
    reply = await client.chat(
        model="tiny", messages=[{"role": "user", "content": "still there?"}], timeout=60
    )
    assert reply.status == "succeeded"

    letters = await _dead_letters(stack, marker, expected=3, timeout=30)
    by_topic = {letter.source_topic: letter for letter in letters}
    assert set(by_topic) == set(poison)
    for topic, letter in by_topic.items():
        assert letter.value == poison[topic]
        assert letter.key == b"poison"
        assert letter.reason
    assert "JobRequest" in by_topic[topics.requests].reason
    assert by_topic[topics.requests].consumer == "enricher"
    assert by_topic[topics.inference("tiny")].consumer == "inference-tiny"
    assert "version" in by_topic[topics.completions].reason


async def test_completions_the_ledger_cannot_take_are_dead_lettered(
    stack: Stack, client: KontextClient
) -> None:
    conversation = f"dl-{uuid.uuid4().hex}"
    common = {"conversation_id": conversation, "model": "tiny"}
    unknown = JobCompletion(
        job_id=uuid.uuid4(), status="failed", error=ErrorInfo(code="x", message="y"), **common
    )
    # Postgres text cannot hold NUL: retrying this batch would never succeed.
    unstorable = JobCompletion(
        job_id=uuid.uuid4(),
        status="succeeded",
        output="a\x00b",
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4),
        **common,
    )
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
    await producer.start()
    try:
        for completion in (unknown, unstorable):
            await producer.send_and_wait(
                stack.settings.topics.completions, completion.encode(), key=b"poison"
            )
    finally:
        await producer.stop()

    reply = await client.chat(
        model="tiny", messages=[{"role": "user", "content": "still recording?"}], timeout=60
    )
    assert reply.status == "succeeded"
    letters = await _dead_letters(stack, conversation.encode(), expected=2, timeout=30)
    reasons = sorted(letter.reason for letter in letters)
    assert len(reasons) == 2 and all(letter.consumer == "recorder" for letter in letters)
    assert "cannot be stored" in reasons[0] and "unknown job" in reasons[1]
