"""The fault-injection scenarios: each runs a steady load while one fault hits the stack.

Every accepted job must end up answered exactly once: final in the ledger and
exactly one reply on the reply topic (and, with a webhook, delivered under one
webhook id). Recovery time runs from the fault's repair until every job accepted
before it has its first answer.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from kontext.chaos.cluster import ENGINE, Cluster
from kontext.chaos.load import Final, LoadGenerator, ReplyTally, final_jobs, in_flight
from kontext.chaos.receiver import WebhookReceiver
from schemas.events import DeadLetter
from workers import catalog

SETTLE_TIMEOUT_S = 120.0
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass
class Row:
    """One line of the chaos table."""

    scenario: str
    submitted: int
    answered: int
    lost: int
    answered_twice: int
    recovery_s: float | None
    notes: list[str] = field(default_factory=list)


@dataclass
class Chaos:
    """What every scenario works with: the cluster, the reply tally, a ledger pool."""

    cluster: Cluster
    tally: ReplyTally
    pool: asyncpg.Pool
    rate: float = 4.0
    duration: float = 20.0


Fault = Callable[[LoadGenerator], Awaitable[list[float]]]
"""Injects faults while the load runs; returns when each was repaired (unix times)."""


def chat_body(webhook: str | None = None) -> Callable[[int], dict[str, Any]]:
    def body(n: int) -> dict[str, Any]:
        job: dict[str, Any] = {
            "model": ENGINE,
            "messages": [{"role": "user", "content": f"chaos job {n}: say something"}],
            "max_tokens": 32,
        }
        if webhook is not None:
            job["webhook"] = {"url": webhook}
        return job

    return body


async def _finals(pool: asyncpg.Pool, ids: list[UUID]) -> dict[UUID, Final] | None:
    """Final statuses, or None while the database is unreachable."""
    try:
        return await final_jobs(pool, ids)
    except DB_ERRORS:
        return None


def _lost_with_broker(tally: ReplyTally, finals: dict[UUID, Final]) -> set[UUID]:
    """Jobs whose reply the broker acknowledged and then lost when it restarted (in-memory
    storage): answered in the ledger (GET, long-poll, webhooks), not on the reply topic."""
    return {
        j
        for j, final in finals.items()
        if not tally.replies[j]
        and final.replied_at is not None
        and any(final.replied_at <= end for _, end in tally.outages)
    }


def _answered(
    chaos: Chaos, ids: list[UUID], finals: dict[UUID, Final], receiver: WebhookReceiver | None
) -> list[UUID]:
    """Jobs final in the ledger, replied on the topic (and delivered to the receiver)."""
    lost_with_broker = _lost_with_broker(chaos.tally, finals)
    return [
        j
        for j in ids
        if j in finals
        and (chaos.tally.replies[j] > 0 or j in lost_with_broker)
        and (receiver is None or receiver.by_job[j] > 0)
    ]


async def _settle(
    chaos: Chaos, load: LoadGenerator, receiver: WebhookReceiver | None
) -> dict[UUID, Final]:
    """Wait until every accepted job is answered, or the timeout; then watch a while longer."""
    ids = list(load.accepted)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    finals: dict[UUID, Final] = {}
    while time.monotonic() < deadline:
        finals = await _finals(chaos.pool, ids) or finals
        if len(_answered(chaos, ids, finals, receiver)) == len(ids):
            break
        await asyncio.sleep(0.25)
    # Late duplicates come from re-drives past the job lease: watch one lease longer.
    await asyncio.sleep(chaos.cluster.lease_s + 3)
    return await _finals(chaos.pool, ids) or finals


async def run(
    chaos: Chaos,
    name: str,
    fault: Fault,
    receiver: WebhookReceiver | None = None,
    duration: float | None = None,
) -> Row:
    """Run the load with ``fault`` injected, then count answers per accepted job.

    Recovery is the worst over the repairs: from each, until every job accepted
    before it was answered.
    """
    load = LoadGenerator(
        chaos.cluster.api_url,
        chaos.rate,
        duration or chaos.duration,
        chat_body(receiver.url if receiver else None),
        api_key=chaos.cluster.api_key,
    )
    submitting = asyncio.create_task(load.run())
    repairs = await fault(load)
    await submitting
    finals = await _settle(chaos, load, receiver)
    ids = list(load.accepted)
    tally = chaos.tally
    answered = _answered(chaos, ids, finals, receiver)
    twice = [
        j for j in ids if tally.replies[j] > 1 or (receiver is not None and receiver.by_job[j] > 1)
    ]
    done = set(answered)
    firsts = receiver.first_delivery if receiver else tally.first_reply
    recovery: float | None = 0.0
    for repaired_at in repairs:
        before = [j for j, at in load.accepted.items() if at <= repaired_at]
        if not all(j in done for j in before):
            recovery = None
            break
        answers = [firsts.get(j, finals[j].completed_at) - repaired_at for j in before]
        recovery = max([recovery or 0.0, *answers])
    row = Row(name, len(ids), len(answered), len(ids) - len(answered), len(twice), recovery)
    lost_with_broker = _lost_with_broker(tally, finals)
    if lost_with_broker:
        row.notes.append(
            f"{len(lost_with_broker)} replies acknowledged then lost by the restarted broker "
            "(in-memory storage; answered in the ledger)"
        )
    failed = sum(1 for j in answered if finals[j].status == "failed")
    if failed:
        row.notes.append(f"{failed} answered as failed")
    if load.refused:
        refused = ", ".join(f"{n}x {why}" for why, n in sorted(load.refused.items()))
        row.notes.append(f"refused at submission: {refused}")
    if receiver is not None:
        repeats = sum(1 for n in receiver.by_webhook_id.values() if n > 1)
        row.notes.append(f"{sum(receiver.by_job.values())} deliveries, {repeats} webhook ids twice")
    crashed = chaos.cluster.dead()
    if crashed:
        row.notes.append(f"crashed: {', '.join(crashed)}")
    return row


async def kill_service(
    chaos: Chaos, name: str, kills: int = 2, every_s: float = 4.0, duration: float | None = None
) -> Row:
    """kill -9 one service under load, several times, restarting it each time.

    Each kill waits (a few seconds at most) for jobs admitted and not yet answered, so
    it lands while work is in the pipeline's hands. Recovery runs from each kill (not
    from its restart) until every job accepted before it was answered.
    """
    in_pipe: list[int] = []

    async def fault(load: LoadGenerator) -> list[float]:
        kills_at = []
        for _ in range(kills):
            await asyncio.sleep(every_s)
            deadline = time.monotonic() + 3
            running = 0
            while not running and time.monotonic() < deadline:
                running = await in_flight(chaos.pool, list(load.accepted))
                await asyncio.sleep(0 if running else 0.05)
            in_pipe.append(running)
            kills_at.append(time.time())
            await chaos.cluster.kill_and_restart(name)
        return kills_at

    row = await run(chaos, f"kill -9 {name} x{kills}", fault, duration=duration)
    row.notes.append(f"jobs in flight at each kill: {in_pipe}; recovery from each kill")
    return row


async def fresh_broker(chaos: Chaos, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Between scenarios, nothing in flight: restart the broker, then wait until a job
    goes through again. The embedded broker keeps every message in memory and serves
    fetches more slowly as its log grows (at 200 jobs/s its CPU rose from ~40% to ~70%
    of a core over four 30 s scenarios), so each scenario starts on an empty log, as
    against Kafka, whose fetches do not slow down with retention."""
    async with chaos.tally.outage():
        await chaos.cluster.restart_broker()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = LoadGenerator(
            chaos.cluster.api_url, 1, 1, chat_body(), api_key=chaos.cluster.api_key
        )
        await probe.run()
        answer_by = time.monotonic() + 10
        while probe.accepted and time.monotonic() < answer_by:
            if all(chaos.tally.replies[j] for j in probe.accepted):
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"no job answered within {timeout:g} s of restarting the broker")


async def restart_broker(chaos: Chaos) -> Row:
    """Restart the broker: every message, topic and committed offset is gone."""

    async def fault(_: LoadGenerator) -> list[float]:
        await asyncio.sleep(chaos.duration / 3)
        async with chaos.tally.outage():
            await chaos.cluster.restart_broker()
        return [time.time()]

    return await run(chaos, "restart broker", fault)


async def restart_postgres(chaos: Chaos, down_s: float = 3.0) -> Row:
    """Stop Postgres for a few seconds, then start it on the same data dir and port."""

    async def fault(_: LoadGenerator) -> list[float]:
        await asyncio.sleep(chaos.duration / 3)
        await asyncio.to_thread(chaos.cluster.stop_database)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(chaos.cluster.start_database)
        return [time.time()]

    row = await run(chaos, "restart Postgres", fault)
    row.notes.append(f"down {down_s:.0f} s")
    return row


async def webhook_receiver_down(chaos: Chaos, receiver: WebhookReceiver, down_s: float) -> Row:
    """Every job carries a webhook; the receiver refuses connections for a while."""

    async def fault(_: LoadGenerator) -> list[float]:
        await asyncio.sleep(chaos.duration / 4)
        receiver.stop()
        await asyncio.sleep(down_s)
        receiver.start()
        return [time.time()]

    row = await run(chaos, "webhook receiver down", fault, receiver)
    row.notes.append(f"receiver down {down_s:.0f} s")
    return row


def poison_values(rng: random.Random, n: int) -> bytes:
    """Random bytes, random JSON, or a well-formed event of an unknown version."""
    kind = n % 3
    if kind == 0:
        return rng.randbytes(rng.randint(0, 64))
    if kind == 1:
        return orjson.dumps({"version": 1, "job_id": rng.random(), "n": n})
    return orjson.dumps({"version": 2, "job_id": str(UUID(int=rng.getrandbits(128)))})


def consumers_of(chaos: Chaos, topic: str) -> int:
    """How many consumer groups dead-letter a bad message on ``topic``."""
    return sum(1 for group in catalog.groups(chaos.cluster.settings) if topic in group.topics)


async def poison(chaos: Chaos, every_s: float = 0.25) -> Row:
    """Bad messages on every consumed topic, mixed into good traffic."""
    settings = chaos.cluster.settings
    topics = settings.topics
    targets = [topics.requests, topics.inference(ENGINE), topics.completions]
    tag = os.urandom(4).hex().encode()
    sent: dict[bytes, str] = {}
    rng = random.Random(7)

    async def fault(_: LoadGenerator) -> list[float]:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
        await producer.start()
        try:
            deadline = time.monotonic() + chaos.duration
            while time.monotonic() < deadline:
                topic = targets[len(sent) % len(targets)]
                key = b"poison-" + tag + b"-" + str(len(sent)).encode()
                await producer.send_and_wait(topic, poison_values(rng, len(sent)), key=key)
                sent[key] = topic
                await asyncio.sleep(every_s)
        finally:
            await producer.stop()
        return [time.time()]

    row = await run(chaos, "poison messages", fault)
    want = sum(consumers_of(chaos, t) for t in sent.values())
    letters = await dead_letters(settings.bootstrap, topics.dead_letters, b"poison-" + tag, want)
    unexplained = [d for d in letters if not d.reason]
    missing = {k for k in sent} - {d.key for d in letters}
    row.notes.append(f"{len(sent)} poison -> {len(letters)} dead letters (want {want})")
    if missing or unexplained:
        row.notes.append(f"{len(missing)} not dead-lettered, {len(unexplained)} without reason")
    return row


async def dead_letters(
    bootstrap: str, topic: str, key_prefix: bytes, want: int, timeout: float = 60.0
) -> list[DeadLetter]:
    """Dead letters whose key starts with ``key_prefix``: read until ``want`` or timeout."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    found: list[DeadLetter] = []
    try:
        deadline = time.monotonic() + timeout
        while len(found) < want and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                for message in messages:
                    if message.key is not None and message.key.startswith(key_prefix):
                        found.append(DeadLetter.decode(message.value))
    finally:
        await consumer.stop()
    return found
