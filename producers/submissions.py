"""The submissions gateway: jobs from any Kafka client, answered on a reply topic.

A client produces a ``POST /v1/jobs`` body to ``<prefix>.submissions`` with the
headers of ``schemas.submissions``: ``authorization`` (the tenant's API key),
``correlation-id`` and, optionally, ``reply-topic`` (the deployment's reply topic,
or one under it: ``<prefix>.replies.<name>``, which must exist). The gateway reads
micro-batches (one fetch each), verifies each distinct key of a batch once (through
a ``KeyCache``, revocation pushed), and submits the batch's jobs concurrently
through ``producers.submit.submit``: they share the ledger's group-committed
inserts, and get what ``POST /v1/jobs`` gives (admission, limits, memory, usage,
webhooks).

Every submission with a correlation id is answered once on its reply topic, with
that id as a header: a refused one at once, with ``SubmissionRefused`` (the API's
error body and status; nothing is stored); an admitted one by the recorder, with
the job's ``JobReply``. The correlation id is the job's idempotency key (per tenant;
a body's own ``idempotency_key`` takes its place): a resent one runs nothing new,
and is answered again, with the job's outcome, only once that job is final (while it
runs, its one reply answers both). A message without a correlation id cannot be
answered: it is dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry import trace

from kontext import tracing
from kontext.connections import FetchTempo
from kontext.settings import Settings
from kontext.store import keys, ledger
from producers.key_cache import KeyCache
from producers.policies import IntakePolicies
from producers.refusals import Answer, answer_for
from producers.submit import submit
from schemas.api import FINAL_STATUSES, ApiError, JobSubmission, error_type
from schemas.events import ChatCompletion, ErrorInfo, JobReply, ReplyRoute
from schemas.submissions import (
    AUTHORIZATION_HEADER,
    CORRELATION_ID_HEADER,
    CORRELATION_ID_MAX_LENGTH,
    REPLY_TOPIC_HEADER,
    SubmissionRefused,
)
from schemas.topics import JOB_ID_HEADER, Group
from workers.consumer import BatchConsumer
from workers.deadletter import DeadLetters
from workers.policies.chain import PolicyChain
from workers.records import Record
from workers.services import Resources, Service, service

log = logging.getLogger(__name__)

NAME = "submissions"
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
"""A legal Kafka topic name."""
TOPICS_REFRESH_S = 1.0
"""How often, at most, a reply topic not seen yet makes the gateway list the topics."""


@dataclass(frozen=True)
class Outbound:
    """An answer to publish now."""

    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class Envelope:
    """What a submission's headers say: who sends it, and where its answer goes."""

    correlation_id: str | None
    reply_topic: str | None
    key: str | None


def _header(record: Record, name: str, lenient: bool = False) -> str | None:
    """The last value of header ``name`` (case-insensitive) as text; None if absent or
    not UTF-8 (``lenient``: its bytes that are not UTF-8 replaced)."""
    found: bytes | None = None
    for key, value in record.headers:
        if key.lower() == name and value is not None:
            found = value
    if found is None:
        return None
    try:
        return found.decode(errors="replace" if lenient else "strict")
    except UnicodeDecodeError:
        return None


def envelope(record: Record) -> Envelope:
    """The submission's headers; the key taken from ``Bearer <key>`` or bare (a key that
    is not UTF-8 is kept, to be refused as invalid rather than as missing)."""
    key = _header(record, AUTHORIZATION_HEADER, lenient=True)
    if key is not None:
        scheme, _, rest = key.strip().partition(" ")
        key = rest.strip() if scheme.lower() == "bearer" else key.strip()
    return Envelope(
        correlation_id=_header(record, CORRELATION_ID_HEADER),
        reply_topic=_header(record, REPLY_TOPIC_HEADER),
        key=key or None,
    )


class ReplyTopics:
    """The reply topics a submission may name: the deployment's reply topic, or an
    existing one under it (``<prefix>.replies.<name>``), so the recorder never writes
    to another of the pipeline's topics, nor waits on one that does not exist."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default = settings.topics.replies
        self._known = {self.default}
        self._listed_at = 0.0
        self._listing = asyncio.Lock()

    def allowed(self, topic: str) -> bool:
        return topic == self.default or (
            topic.startswith(f"{self.default}.") and TOPIC_NAME.fullmatch(topic) is not None
        )

    async def exists(self, topic: str) -> bool:
        if topic in self._known:
            return True
        async with self._listing:
            if topic not in self._known and time.monotonic() - self._listed_at >= TOPICS_REFRESH_S:
                admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.bootstrap)
                await admin.start()
                try:
                    self._known |= set(await admin.list_topics())
                finally:
                    await admin.close()
                self._listed_at = time.monotonic()
        return topic in self._known


def _conversation_of(value: bytes | None) -> str | None:
    """The conversation a submission names, if its value is a JSON object naming one."""
    try:
        body = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    conversation = body.get("conversation_id") if isinstance(body, dict) else None
    return conversation if isinstance(conversation, str) else None


def _refusal(status: int, code: str, message: str) -> Answer:
    return Answer(status, ApiError(code=code, message=message, type=error_type(status)))


class SubmissionGateway:
    """Submits each micro-batch of the submissions topic and answers what it refuses."""

    name = NAME

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        keys: KeyCache,
        chain: PolicyChain,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.keys = keys
        self.chain = chain
        self.admitter = ledger.Admitter(pool)
        self.reply_topics = ReplyTopics(settings)
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, NAME)

    async def handle(self, records: Sequence[Record]) -> None:
        envelopes = [envelope(record) for record in records]
        distinct = sorted({e.key for e in envelopes if e.key is not None})
        found = await asyncio.gather(*(self.keys.verify(self.pool, k) for k in distinct))
        verified = dict(zip(distinct, found, strict=True))
        turns: dict[str, asyncio.Lock] = {}

        async def in_order(record: Record, sent: Envelope) -> Outbound | str | None:
            if not tracing.enabled():
                return await ordered(record, sent)
            # The submitter's ``traceparent`` header, if any, continues into the job.
            span = tracing.start(
                "submissions receive",
                tracing.extract(record.headers),
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.destination.name": record.topic,
                    "messaging.kafka.offset": record.offset,
                },
            )
            with trace.use_span(span, end_on_exit=True):
                return await ordered(record, sent)

        async def ordered(record: Record, sent: Envelope) -> Outbound | str | None:
            # One conversation's submissions are taken one after another, in the
            # order of the topic; other conversations' alongside.
            conversation = _conversation_of(record.value)
            if conversation is None:
                return await self._take(record, sent, verified)
            async with turns.setdefault(conversation, asyncio.Lock()):
                return await self._take(record, sent, verified)

        answers = await asyncio.gather(
            *(in_order(r, e) for r, e in zip(records, envelopes, strict=True))
        )
        sends: list[asyncio.Future[object]] = []
        for record, answer in zip(records, answers, strict=True):
            if isinstance(answer, str):
                sends.append(await self.dead_letters.send(record, answer))
            elif answer is not None:
                sends.append(
                    await self.producer.send(
                        answer.topic, answer.value, key=answer.key, headers=answer.headers
                    )
                )
        await asyncio.gather(*sends)

    async def _take(
        self,
        record: Record,
        sent: Envelope,
        verified: dict[str, keys.VerifiedKey | None],
    ) -> Outbound | str | None:
        """Submit one record: the answer to send now, a dead letter's reason, or None
        (the recorder answers the job)."""
        if sent.correlation_id is None:
            return f"no {CORRELATION_ID_HEADER} header (UTF-8): the submission cannot be answered"
        correlation = sent.correlation_id
        topic = self.reply_topics.default

        def refused(answer: Answer) -> Outbound:
            value = SubmissionRefused(
                error=answer.error, status=answer.status, retry_after_s=answer.retry_after_s
            )
            headers = [(CORRELATION_ID_HEADER, correlation.encode())]
            return Outbound(topic, value.encode(), record.key, headers)

        if sent.reply_topic is not None and sent.reply_topic != topic:
            if not self.reply_topics.allowed(sent.reply_topic):
                return refused(
                    _refusal(
                        422,
                        "reply_topic_refused",
                        f"a reply topic is {topic} or a topic named {topic}.<name>",
                    )
                )
            if not await self.reply_topics.exists(sent.reply_topic):
                return refused(
                    _refusal(404, "reply_topic_not_found", f"no topic {sent.reply_topic}")
                )
            topic = sent.reply_topic
        if (
            len(correlation) > CORRELATION_ID_MAX_LENGTH
            or not correlation.strip()
            or "\x00" in correlation
        ):
            return refused(
                _refusal(
                    422,
                    "invalid_correlation_id",
                    f"a correlation id has 1 to {CORRELATION_ID_MAX_LENGTH} characters,"
                    " none of them NUL",
                )
            )
        if len(record.value or b"") > self.settings.max_body_bytes:
            return refused(
                _refusal(
                    413, "body_too_large", f"the body exceeds {self.settings.max_body_bytes} bytes"
                )
            )
        if sent.key is None:
            return refused(
                _refusal(
                    401, "unauthorized", f"missing API key: send an '{AUTHORIZATION_HEADER}' header"
                )
            )
        principal = verified.get(sent.key)
        if principal is None:
            return refused(_refusal(401, "unauthorized", "invalid or revoked API key"))
        try:
            submission = JobSubmission.model_validate_json(record.value or b"")
            if submission.idempotency_key is None:
                submission = submission.model_copy(update={"idempotency_key": correlation})
            job, created = await submit(
                self.settings,
                self.admitter,
                self.producer,
                submission,
                tenant_id=principal.tenant_id,
                key_id=principal.key_id,
                chain=self.chain,
                reply_to=ReplyRoute(topic=topic, correlation_id=correlation),
            )
        except Exception as exc:  # a refusal is answered; anything else retries the batch
            answer = answer_for(exc)
            if answer is None:
                raise  # Postgres or Kafka down: the batch is retried, nothing is lost
            return refused(answer)
        if created:
            return None
        first = (job.request or {}).get("reply_to")
        first_route = ReplyRoute.model_validate(first) if first else None
        if job.status not in FINAL_STATUSES:
            if first_route is not None and first_route.correlation_id == correlation:
                return None  # the job's one reply answers this resend too
            return refused(
                _refusal(
                    409,
                    "idempotency_key_in_use",
                    f"job {job.id} of this idempotency key is still running, and answers"
                    " the submission that made it; send this one again once it is final",
                )
            )
        # A resent correlation id whose job is final: its outcome, once more, where the
        # job's first submission asked (never a private topic's result on a shared one).
        if first_route is not None:
            topic = first_route.topic
        reply = JobReply(
            job_id=job.id,
            conversation_id=job.conversation_id,
            tenant_id=principal.tenant_id,
            status="succeeded" if job.status == "succeeded" else "failed",
            result=ChatCompletion.model_validate(job.result) if job.result else None,
            error=ErrorInfo.model_validate(job.error) if job.error else None,
        )
        headers = [
            (JOB_ID_HEADER, str(job.id).encode()),
            (CORRELATION_ID_HEADER, correlation.encode()),
        ]
        return Outbound(topic, reply.encode(), job.conversation_id.encode(), headers)


class GatewayService:
    """The gateway's consume loop, with the key cache and policies it runs beside."""

    name = NAME

    def __init__(self, consumer: BatchConsumer, keys: KeyCache, policies: IntakePolicies) -> None:
        self.consumer = consumer
        self.keys = keys
        self.policies = policies

    async def run(self) -> None:
        self.keys.start()
        await self.policies.start()
        try:
            await self.consumer.run()
        finally:
            await self.policies.close()
            await self.keys.close()

    def ready(self) -> bool:
        return self.consumer.ready()

    async def stop(self) -> None:
        self.consumer.stop()


def groups(settings: Settings) -> list[Group]:
    return [settings.topics.group(NAME, NAME, settings.topics.submissions)]


@service(NAME, groups)
async def submissions_service(shared: Resources) -> list[Service]:
    settings = shared.settings
    [reads] = groups(settings)
    cache = KeyCache(settings.dsn, settings.auth_cache_ttl_s)
    policies = IntakePolicies(settings)
    gateway = SubmissionGateway(settings, shared.pool, shared.producer, cache, policies.chain)
    consumer = BatchConsumer(
        shared.consumer(reads),
        gateway,
        max_size=settings.stage_batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
        tempo=FetchTempo.of(settings),
    )
    return [GatewayService(consumer, cache, policies)]
