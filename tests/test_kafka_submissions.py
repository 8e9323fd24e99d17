"""Kafka-native submission against the running stack, from a Kafka client that is not
ours (librdkafka, through confluent-kafka): jobs produced to the submissions topic with
headers, every answer read back from a reply topic by its correlation id."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.connections import ensure_topics
from kontext.settings import Settings
from kontext.store import keys
from producers.client import JobTimedOut, KontextClient, KontextError
from producers.key_cache import KeyCache
from producers.policies import IntakePolicies
from producers.submissions import SubmissionGateway
from schemas.events import DeadLetter, JobReply
from schemas.submissions import SubmissionRefused
from tests.conftest import Stack, wait_for
from tests.receiver import serving
from workers.records import Record

TIMEOUT_S = 90.0
BURST = 1000
BURST_TIMEOUT_S = 420.0

Headers = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True)
class Answer:
    """One message read from a reply topic."""

    partition: int
    headers: dict[str, bytes]
    raw: bytes
    value: Any

    @property
    def refusal(self) -> SubmissionRefused:
        assert "job-id" not in self.headers, self.value
        return SubmissionRefused.model_validate(self.value)

    @property
    def reply(self) -> JobReply:
        reply = JobReply.model_validate(self.value)
        assert self.headers["job-id"] == str(reply.job_id).encode()
        return reply


def _bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else value or b""


class Reader:
    """Reads a topic from its beginning in a group of its own and keeps every message by
    its correlation id (or, with ``by_key``, by its Kafka key)."""

    def __init__(self, stack: Stack, topic: str, *, by_key: bool = False) -> None:
        self.by_key = by_key
        self.found: dict[str, list[Answer]] = defaultdict(list)
        self.fenced: dict[str, set[int]] = defaultdict(set)
        """The partitions each fence was read back from."""
        self.by_job: dict[bytes, list[Any]] = defaultdict(list)
        """Every value read, by its ``job-id`` header."""
        self.consumer = Consumer(
            {
                "bootstrap.servers": stack.settings.bootstrap,
                "group.id": f"test-submissions-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
            }
        )
        self.consumer.subscribe([topic])

    def _take(self, message: Message) -> None:
        found = message.headers() or []  # librdkafka gives a list of pairs
        pairs = found.items() if isinstance(found, dict) else found
        headers = {k: _bytes(v) for k, v in pairs}
        partition = message.partition() or 0
        if "fence" in headers:
            self.fenced[headers["fence"].decode()].add(partition)
            return
        raw = _bytes(message.value())
        if "job-id" in headers:
            self.by_job[headers["job-id"]].append(orjson.loads(raw))
        if self.by_key:
            name = _bytes(message.key()).decode(errors="replace")
        else:
            correlation = headers.get("correlation-id")
            if correlation is None:
                return
            name = correlation.decode()
        self.found[name].append(Answer(partition, headers, raw, orjson.loads(raw)))

    def until(self, done: Any, timeout: float = TIMEOUT_S) -> None:
        """Read until ``done()`` is true; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"not answered within {timeout}s"
            for message in self.consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is None:
                    self._take(message)

    def answers(self, *names: str, timeout: float = TIMEOUT_S) -> dict[str, list[Answer]]:
        """The answers to ``names`` once each has at least one."""
        self.until(lambda: all(self.found.get(n) for n in names), timeout)
        return {n: self.found[n] for n in names}

    def one(self, name: str) -> Answer:
        [answer] = self.answers(name)[name]
        return answer

    def close(self) -> None:
        self.consumer.close()


def _producer(stack: Stack) -> Producer:
    return Producer({"bootstrap.servers": stack.settings.bootstrap, "message.max.bytes": 4_000_000})


def _send(
    stack: Stack, messages: list[tuple[bytes | None, Headers]], key: bytes | None = None
) -> None:
    """Produce ``(value, headers)`` pairs to the submissions topic and wait for delivery."""
    producer = _producer(stack)
    failed: list[object] = []
    for value, headers in messages:
        producer.produce(
            stack.settings.topics.submissions,
            value,
            key=key,
            headers=headers,
            on_delivery=lambda err, _msg: failed.append(err) if err else None,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert not failed, failed


def _headers(key: str | None, correlation: str | None, reply_topic: str | None = None) -> Headers:
    headers: Headers = []
    if key is not None:
        headers.append(("authorization", key.encode()))
    if correlation is not None:
        headers.append(("correlation-id", correlation.encode()))
    if reply_topic is not None:
        headers.append(("reply-topic", reply_topic.encode()))
    return headers


def _body(content: str = "hello", **fields: Any) -> bytes:
    return orjson.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            **fields,
        }
    )


def _ids(n: int = 1) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"corr-{tag}-{i}" for i in range(n)]


def _create_topic(stack: Stack, name: str, partitions: int = 2) -> str:
    admin = AdminClient({"bootstrap.servers": stack.settings.bootstrap})
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(timeout=30)
    return name


@dataclass(frozen=True)
class Tenants:
    a: str
    b: str
    tenant_a: str


@pytest.fixture(scope="module")
async def tenants(pool: asyncpg.Pool) -> Tenants:
    tag = uuid.uuid4().hex[:8]
    a = await keys.create(pool, f"kafka-a-{tag}")
    b = await keys.create(pool, f"kafka-b-{tag}")
    return Tenants(a=a.key, b=b.key, tenant_a=a.tenant_id)


@pytest.fixture
def replies(stack: Stack) -> Iterator[Reader]:
    """The deployment's reply topic, read from its beginning."""
    reader = Reader(stack, stack.settings.topics.replies)
    yield reader
    reader.close()


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:
        yield client


async def _jobs(pool: asyncpg.Pool, tenant: str, *idempotency_keys: str) -> list[asyncpg.Record]:
    jobs: list[asyncpg.Record] = await pool.fetch(
        "SELECT id, status, replied_at, request FROM jobs "
        "WHERE tenant_id = $1 AND idempotency_key = ANY($2::text[])",
        tenant,
        list(idempotency_keys),
    )
    return jobs


async def test_a_submission_is_answered_on_the_reply_topic_with_its_result(
    stack: Stack, tenants: Tenants, replies: Reader, pool: asyncpg.Pool
) -> None:
    first, second = _ids(2)
    conversation = f"kafka-{uuid.uuid4().hex[:8]}"
    _send(
        stack,
        [
            (
                _body("My name is Ada.", conversation_id=conversation),
                _headers(f"Bearer {tenants.a}", first),
            )
        ],
    )
    reply = replies.one(first).reply
    assert reply.status == "succeeded" and reply.result is not None
    assert reply.conversation_id == conversation and reply.tenant_id == tenants.tenant_a
    assert reply.result.model == "tiny"
    assert reply.result.choices[0].message.content

    # The next turn (a bare key this time) is answered with the first one in memory.
    _send(
        stack,
        [(_body("What is my name?", conversation_id=conversation), _headers(tenants.a, second))],
    )
    again = replies.one(second).reply
    assert again.status == "succeeded" and again.result is not None
    assert again.result.context is not None and again.result.context.turns

    [job] = await _jobs(pool, tenants.tenant_a, first)
    assert job["id"] == reply.job_id and job["status"] == "succeeded"
    turns = await pool.fetch(
        "SELECT role, content FROM turns WHERE conversation_id = $1 ORDER BY seq", conversation
    )
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["content"] == "My name is Ada."


async def test_a_job_is_answered_on_the_reply_topic_it_names(
    stack: Stack, tenants: Tenants, replies: Reader
) -> None:
    topic = _create_topic(stack, f"{stack.settings.topics.replies}.custom-{uuid.uuid4().hex[:8]}")
    custom = Reader(stack, topic)
    try:
        [mine, outside, missing] = _ids(3)
        _send(
            stack,
            [
                (_body("routed"), _headers(tenants.a, mine, topic)),
                # Never one of the pipeline's own topics, nor one that does not exist.
                (_body(), _headers(tenants.a, outside, stack.settings.topics.requests)),
                (_body(), _headers(tenants.a, missing, f"{topic}-nowhere")),
            ],
        )
        reply = custom.one(mine).reply
        assert reply.status == "succeeded" and reply.result is not None
        # Resent without a reply topic once final: answered again where it was first asked.
        _send(stack, [(_body("routed"), _headers(tenants.a, mine))])
        custom.until(lambda: len(custom.found[mine]) == 2)
        again = custom.found[mine][1].reply
        assert (again.job_id, again.result) == (reply.job_id, reply.result)
        refused = replies.one(outside).refusal
        assert (refused.status, refused.error.code) == (422, "reply_topic_refused")
        refused = replies.one(missing).refusal
        assert (refused.status, refused.error.code) == (404, "reply_topic_not_found")
        # The result went only where it was asked: nothing of it on the shared reply
        # topic, by the time a job submitted after it is answered there.
        [after] = _ids()
        _send(stack, [(_body("after"), _headers(tenants.a, after))])
        assert replies.one(after).reply.status == "succeeded"
        assert str(reply.job_id).encode() not in replies.by_job
        assert mine not in replies.found
    finally:
        custom.close()


async def test_each_refusal_is_answered_as_the_api_refuses_it(
    stack: Stack, tenants: Tenants, replies: Reader, pool: asyncpg.Pool, http: httpx.AsyncClient
) -> None:
    owned = f"kafka-owned-{uuid.uuid4().hex[:8]}"
    _send(
        stack, [(_body("mine", conversation_id=owned), _headers(tenants.b, (setup := _ids()[0])))]
    )
    assert replies.one(setup).reply.status == "succeeded"

    cases: dict[str, tuple[bytes, str | None, int, str]] = {
        "bad json": (b'{"model": "tiny", "messages": [', tenants.a, 400, "malformed_json"),
        "invalid body": (
            orjson.dumps({"model": "tiny", "messages": []}),
            tenants.a,
            422,
            "invalid_request",
        ),
        "no key": (_body(), None, 401, "unauthorized"),
        "bad key": (_body(), "kx_00000000_" + "x" * 43, 401, "unauthorized"),
        "unknown model": (_body(model="gpt-9"), tenants.a, 400, "unknown_model"),
        "too many tokens": (_body(max_tokens=100_000), tenants.a, 422, "max_tokens_out_of_range"),
        "another tenant's conversation": (
            _body(conversation_id=owned),
            tenants.a,
            404,
            "conversation_not_found",
        ),
    }
    ids = dict(zip(cases, _ids(len(cases)), strict=True))
    _send(stack, [(body, _headers(key, ids[name])) for name, (body, key, _, _) in cases.items()])
    answers = replies.answers(*ids.values())
    for name, (body, key, status, code) in cases.items():
        [answer] = answers[ids[name]]
        refused = answer.refusal
        assert (refused.status, refused.error.code) == (status, code), name
        # The same body and key at the API: the same status and error.
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        response = await http.post("/v1/jobs", content=body, headers=headers)
        assert response.status_code == status, (name, response.text)
        if status != 401:  # the API's 401 comes from its auth layer, with its own wording
            api = {k: v for k, v in response.json()["error"].items() if k != "param"}
            mine = refused.error.model_dump(exclude_none=True, exclude={"param"})
            assert api == mine, name
    assert answers[ids["unknown model"]][0].refusal.error.served_models == ["tiny", "smollm2"]
    assert answers[ids["invalid body"]][0].refusal.error.details

    # Nothing was stored for a refused submission.
    assert await _jobs(pool, tenants.tenant_a, *ids.values()) == []


async def test_a_revoked_key_is_refused_at_once(
    stack: Stack, pool: asyncpg.Pool, replies: Reader
) -> None:
    key = await keys.create(pool, f"kafka-revoked-{uuid.uuid4().hex[:8]}")
    before = _ids()[0]
    _send(stack, [(_body(), _headers(key.key, before))])
    assert replies.one(before).reply.status == "succeeded"  # the key is cached now

    await keys.revoke(pool, key.prefix)
    tries: list[str] = []

    def refused() -> bool:
        # The revocation reaches the gateway by NOTIFY; its cache would keep the key 300 s.
        if tries:
            replies.answers(tries[-1])
            if replies.found[tries[-1]][0].value.get("status") == 401:
                return True
        tries.append(_ids()[0])
        _send(stack, [(_body(), _headers(key.key, tries[-1]))])
        return False

    replies.until(refused, timeout=30)
    assert replies.found[tries[-1]][0].refusal.error.code == "unauthorized"


async def test_poison_messages_never_stop_the_gateway(
    stack: Stack, tenants: Tenants, replies: Reader
) -> None:
    letters = Reader(stack, stack.settings.topics.dead_letters, by_key=True)
    try:
        tag = uuid.uuid4().hex[:8]
        huge, after, binary_key = _ids(3)
        producer = _producer(stack)
        topic = stack.settings.topics.submissions
        # A key that is not text: refused as invalid (not as missing).
        producer.produce(
            topic,
            _body(),
            headers=[("authorization", b"kx_\xff\xfe"), ("correlation-id", binary_key.encode())],
        )
        # No headers at all, and a correlation id that is not text: nowhere to answer.
        producer.produce(topic, b"\x00\xff not json", key=f"poison-{tag}-bare".encode())
        producer.produce(
            topic,
            _body(),
            key=f"poison-{tag}-binary".encode(),
            headers=[("authorization", tenants.a.encode()), ("correlation-id", b"\xff\xfe")],
        )
        assert producer.flush(30) == 0
        _send(
            stack,
            [
                (b"x" * (stack.settings.max_body_bytes + 1), _headers(tenants.a, huge)),
                (None, _headers(tenants.a, f"{huge}-tombstone")),
                (_body("still there?"), _headers(tenants.a, after)),
            ],
        )
        assert replies.one(huge).refusal.status == 413
        refused = replies.one(binary_key).refusal
        assert (refused.status, refused.error.message) == (401, "invalid or revoked API key")
        assert replies.one(f"{huge}-tombstone").refusal.error.code == "malformed_json"
        assert replies.one(after).reply.status == "succeeded"

        bare, binary = f"poison-{tag}-bare", f"poison-{tag}-binary"
        found = letters.answers(bare, binary)
        for name in (bare, binary):
            [letter] = found[name]
            dead = DeadLetter.decode(letter.raw)
            assert dead.consumer == "submissions" and "correlation-id" in dead.reason
        assert DeadLetter.decode(found[bare][0].raw).value == b"\x00\xff not json"
    finally:
        letters.close()


async def test_a_resent_correlation_id_runs_once(
    stack: Stack, tenants: Tenants, replies: Reader, pool: asyncpg.Pool
) -> None:
    [correlation] = _ids()
    message = (_body("only once"), _headers(tenants.a, correlation))
    _send(stack, [message, message, message], key=correlation.encode())
    first = replies.answers(correlation)[correlation][0].reply
    assert first.status == "succeeded"
    [job] = await _jobs(pool, tenants.tenant_a, correlation)
    assert job["id"] == first.job_id
    await wait_for(lambda: _replied(pool, job["id"]), timeout=TIMEOUT_S)

    # Sent again once its job is final: answered once more with the same outcome.
    seen = len(replies.found[correlation])
    _send(stack, [message])
    replies.until(lambda: len(replies.found[correlation]) > seen)
    again = replies.found[correlation][-1].reply
    assert again.job_id == first.job_id
    assert again.result == first.result
    assert {a.reply.job_id for a in replies.found[correlation]} == {first.job_id}
    assert len(await _jobs(pool, tenants.tenant_a, correlation)) == 1


async def _replied(pool: asyncpg.Pool, job_id: uuid.UUID) -> bool:
    return bool(
        await pool.fetchval("SELECT replied_at IS NOT NULL FROM jobs WHERE id = $1", job_id)
    )


async def test_a_burst_is_answered_exactly_once_each(
    stack: Stack, tenants: Tenants, pool: asyncpg.Pool
) -> None:
    partitions = 2
    topic = _create_topic(
        stack, f"{stack.settings.topics.replies}.burst-{uuid.uuid4().hex[:8]}", partitions
    )
    burst = Reader(stack, topic)
    try:
        ids = _ids(BURST)
        _send(
            stack,
            [
                (_body(f"item {n}", max_tokens=1), _headers(tenants.a, c, topic))
                for n, c in enumerate(ids)
            ],
        )
        burst.answers(*ids, timeout=BURST_TIMEOUT_S)

        # Every reply is published once its job is marked replied; then a fence on each
        # partition, read back, proves nothing more was sent before it.
        async def all_replied() -> bool:
            jobs = await _jobs(pool, tenants.tenant_a, *ids)
            return len(jobs) == BURST and all(j["replied_at"] is not None for j in jobs)

        await wait_for(all_replied, timeout=TIMEOUT_S)
        fence = uuid.uuid4().hex
        producer = _producer(stack)
        for partition in range(partitions):
            producer.produce(topic, b"{}", partition=partition, headers=[("fence", fence.encode())])
        assert producer.flush(30) == 0
        burst.until(lambda: burst.fenced[fence] == set(range(partitions)))
    finally:
        burst.close()

    counts = {c: len(burst.found[c]) for c in ids}
    assert set(counts.values()) == {1}, {c: n for c, n in counts.items() if n != 1}
    assert len(burst.found) == BURST
    replies = [burst.found[c][0].reply for c in ids]
    assert all(r.status == "succeeded" for r in replies)
    assert len({r.job_id for r in replies}) == BURST


async def test_one_conversations_turns_run_in_the_topics_order(
    stack: Stack, tenants: Tenants, replies: Reader, pool: asyncpg.Pool
) -> None:
    """Turns of one conversation produced back to back, every other one with a webhook
    (whose check awaits a lookup, the others' not), join the conversation in the order
    they were produced."""
    async with serving() as receiver:
        hook = receiver.hook("ordered").replace("127.0.0.1", "localhost")
        conversation = f"kafka-order-{uuid.uuid4().hex[:8]}"
        ids = _ids(6)
        _send(
            stack,
            [
                (
                    _body(
                        f"turn {n}",
                        conversation_id=conversation,
                        **({"webhook": {"url": hook}} if n % 2 == 0 else {}),
                    ),
                    _headers(tenants.a, correlation),
                )
                for n, correlation in enumerate(ids)
            ],
            key=conversation.encode(),
        )
        replies.answers(*ids)

        async def said() -> list[str]:
            rows = await pool.fetch(
                "SELECT content FROM turns WHERE conversation_id = $1 AND role = 'user' "
                "ORDER BY seq",
                conversation,
            )
            return [row["content"] for row in rows]

        await wait_for(lambda: _all_said(said, len(ids)), timeout=TIMEOUT_S)
        assert await said() == [f"turn {n}" for n in range(len(ids))]


async def _all_said(said: Any, count: int) -> bool:
    return len(await said()) == count


async def test_the_python_client_submits_over_kafka(stack: Stack, tenants: Tenants) -> None:
    """``KontextClient.chat_over_kafka``: a turn answered by correlation id, the next
    turn of its conversation remembering it, and a refusal raised as the API's error."""
    conversation = f"kafka-client-{uuid.uuid4().hex[:8]}"
    settings = stack.settings
    async with KontextClient(
        stack.api_url, settings.bootstrap, topics=settings.topics, api_key=tenants.a
    ) as client:
        first = await client.chat_over_kafka(
            timeout=TIMEOUT_S,
            model="tiny",
            conversation_id=conversation,
            messages=[{"role": "user", "content": "My name is Ada."}],
            max_tokens=4,
        )
        again = await client.chat_over_kafka(
            timeout=TIMEOUT_S,
            model="tiny",
            conversation_id=conversation,
            messages=[{"role": "user", "content": "What is my name?"}],
            max_tokens=4,
            include_prompt=True,
        )
        with pytest.raises(KontextError) as refused:
            await client.chat_over_kafka(
                timeout=TIMEOUT_S,
                model="no-such-model",
                messages=[{"role": "user", "content": "hi"}],
            )
    assert first.status == "succeeded" and first.conversation_id == conversation
    assert again.result is not None and again.result.context is not None
    assert "My name is Ada." in (again.result.context.prompt or "")
    assert (refused.value.status, refused.value.code) == (400, "unknown_model")


async def test_an_idempotency_key_answers_its_own_request_only(
    broker: EmbeddedBroker, database: EmbeddedPostgres, pool: asyncpg.Pool
) -> None:
    """A gateway on topics no enricher reads, so its job stays queued: a resend of the
    job's correlation id waits on the job's one reply; another correlation id with the
    job's idempotency key is told the key is in use, and another request with it that
    the key was used (neither is dropped without an answer)."""
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        database_url=database.url,
        topic_prefix=f"idem{uuid.uuid4().hex[:8]}",
        topic_partitions=1,
        engines=["tiny"],
    )
    topics = settings.topics
    await ensure_topics(settings, topics.all(settings.engines))
    key = await keys.create(pool, f"idem-{uuid.uuid4().hex[:8]}")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
    reader = AIOKafkaConsumer(
        topics.replies, bootstrap_servers=settings.bootstrap, auto_offset_reset="earliest"
    )
    cache = KeyCache(settings.dsn, settings.auth_cache_ttl_s)
    policies = IntakePolicies(settings)
    await producer.start()
    await reader.start()
    try:
        gateway = SubmissionGateway(settings, pool, producer, cache, policies.chain)
        idempotency = f"idem-{uuid.uuid4().hex}"
        body = _body("only once", idempotency_key=idempotency)
        offsets = iter(range(100))

        def record(value: bytes, correlation: bytes) -> Record:
            headers = [("authorization", key.key.encode()), ("correlation-id", correlation)]
            return Record(topics.submissions, 0, next(offsets), None, value, headers)

        await gateway.handle([record(body, b"first")])
        await gateway.handle([record(body, b"first")])  # a producer's retry
        await gateway.handle([record(body, b"second")])
        await gateway.handle([record(_body("another", idempotency_key=idempotency), b"third")])
        await gateway.handle([record(body, b"nul\x00")])
        answers = [await asyncio.wait_for(reader.getone(), 30) for _ in range(3)]
        got = {
            dict(a.headers)["correlation-id"]: SubmissionRefused.model_validate_json(a.value)
            for a in answers
        }
        assert {k: (v.status, v.error.code) for k, v in got.items()} == {
            b"second": (409, "idempotency_key_in_use"),
            b"third": (409, "idempotency_key_reused"),
            b"nul\x00": (422, "invalid_correlation_id"),
        }
        [job] = await _jobs(pool, key.tenant_id, idempotency)
        assert job["status"] == "queued" and str(job["id"]) in got[b"second"].error.message
        assert not await reader.getmany(timeout_ms=500)  # nothing for "first" until it is final
    finally:
        await reader.stop()
        await producer.stop()
        await policies.close()
        await cache.close()


async def test_the_python_client_keeps_to_its_own_reply_topic(
    stack: Stack, tenants: Tenants
) -> None:
    """With ``reply_topic``: a Kafka-native turn is answered there, a turn over HTTP
    through the long poll; a wait that runs out says which job or correlation id to
    wait on again, and waiting again gets the same job's answer."""
    settings = stack.settings
    topic = _create_topic(stack, f"{settings.topics.replies}.client-{uuid.uuid4().hex[:8]}")
    private = Reader(stack, topic)
    try:
        async with KontextClient(
            stack.api_url,
            settings.bootstrap,
            topics=settings.topics,
            api_key=tenants.a,
            reply_topic=topic,
        ) as client:
            body: dict[str, Any] = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 4,
            }
            with pytest.raises(JobTimedOut) as late:
                await client.chat_over_kafka(timeout=0.001, **body)
            correlation = late.value.correlation_id
            assert correlation is not None and late.value.job_id is None
            over_kafka = await client.chat_over_kafka(
                timeout=TIMEOUT_S, correlation_id=correlation, **body
            )
            assert over_kafka.status == "succeeded"
            assert private.one(correlation).reply.job_id == over_kafka.job_id

            with pytest.raises(JobTimedOut) as late:
                await client.chat(timeout=0.001, **body)
            assert late.value.job_id is not None
            over_http = await client.result(late.value.job_id, timeout=TIMEOUT_S)
            assert over_http.status == "succeeded" and over_http.job_id == late.value.job_id
    finally:
        private.close()
