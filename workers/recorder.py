"""The recorder: writes each result to the ledger and the conversation, then replies.

One statement per micro-batch finalises the jobs, stores their turns, counts
their usage, creates their webhook deliveries and settles what their tenants'
limits held. Replies go out only after that, so a client that reads its reply
and sends the next turn always finds the previous one in memory. A job is
replied to once: the ledger remembers a published reply (in the next batch's
statement, or when the recorder stops), and a duplicate completion (a job
re-driven, or redelivered after a worker died) publishes none. When a recorder
dies after publishing but before remembering, the next one finds those replies on
the reply topic and does not send them again (one it cannot find there, it sends:
at least once, never zero). A completion for an unknown job, or one Postgres cannot
store, is dead-lettered. Recording a turn also lets the conversation's next
waiting turn through: its request is published again for the enricher. A job from
the submissions topic is answered on the reply topic its submitter named, with its
correlation id as a header. Once the batch's replies are out, the conversations'
memory is kept up to date (workers/memory.py: embeddings and summaries) before the
batch's offsets are committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry import trace
from pydantic_core import PydanticSerializationError

from kontext import tracing
from kontext.connections import FetchTempo, create_consumer
from kontext.metrics import E2E_LATENCY
from kontext.settings import Settings
from kontext.store import ledger
from kontext.tasks import retrieved_if_failed
from schemas.events import (
    ErrorInfo,
    FinalStatus,
    JobCompletion,
    JobReply,
    JobRequest,
    utcnow,
)
from schemas.submissions import CORRELATION_ID_HEADER
from schemas.topics import JOB_ID_HEADER, Group
from workers.consumer import BatchConsumer
from workers.deadletter import DeadLetters
from workers.engines import load_tokenizer
from workers.intake import publish
from workers.memory import MemoryKeeper
from workers.records import Record
from workers.services import ConsumerService, Resources, Service, service

log = logging.getLogger(__name__)

MARK_IDLE_S = 0.2
"""How long replies wait to be remembered by the next batch's statement before
they are remembered on their own (the recorder is idle)."""
REPLY_CLOCK_SLACK = timedelta(seconds=5)
"""How far before a job's completion (Postgres's clock) its reply's timestamp (the
recorder's clock) may lie."""
REPLY_SCAN_TIMEOUT_S = 30.0
"""The longest a redelivered batch reads the reply topics for replies already sent."""
ROUTE_TIMEOUT_S = 5.0
"""The longest a reply waits for its submitter's reply topic to be found."""

UNSTORABLE = (
    asyncpg.DataError,
    UnicodeEncodeError,
    orjson.JSONEncodeError,
    PydanticSerializationError,
)
"""Values Postgres, the jsonb codec or a model's JSON serialiser refuse: retrying the
same batch never helps."""


class Recorder:
    name = "recorder"

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        memory: MemoryKeeper,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.memory = memory
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)
        self.unmarked: dict[UUID, datetime] = {}
        """Jobs whose replies were published (and when), not yet remembered in the ledger."""
        self._marking: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        """One statement at a time: a batch's and a flush's marks would lock the same
        rows in different orders (a deadlock)."""

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        replied: list[UUID] = []
        recorded: ledger.Recorded | None = None
        with retrieved_if_failed(sends, log, self.name):
            pairs = await self.dead_letters.decode(
                records, JobCompletion.decode, "JobCompletion", sends
            )
            if pairs:
                spans = _record_spans(pairs) if tracing.enabled() else {}
                recorded, stored = await self._record(pairs, sends, spans)
                outcomes = recorded.outcomes
                if spans:
                    _end_record_spans(spans, outcomes)
                _observe_e2e(outcomes, [done for _, done in stored])
                known = {o.job_id for o in outcomes}
                for record, done in stored:
                    if done.job_id not in known:
                        reason = f"JobCompletion for unknown job {done.job_id}"
                        sends.append(await self.dead_letters.send(record, reason))
                # Finalised by an earlier recorder, their replies perhaps published already.
                unsure = [o for o in outcomes if not o.fresh and not o.replied]
                on_topic = await self._already_replied(unsure) if unsure else set()
                for outcome in outcomes:
                    if outcome.replied:
                        continue
                    replied.append(outcome.job_id)
                    if outcome.job_id in on_topic:
                        continue
                    sends.append(await self._reply(outcome, spans.get(outcome.job_id)))
                # The next turns of their conversations, held back until these were recorded.
                sends += await publish(self.settings, self.producer, recorded.redrive)
        if sends:
            await asyncio.gather(*sends)
        if replied:
            sent = utcnow()
            for job_id in replied:
                self.unmarked.setdefault(job_id, sent)
        if self.unmarked and (self._marking is None or self._marking.done()):
            self._marking = asyncio.create_task(self._mark_when_idle())
        if recorded is not None:
            await self.memory.keep(recorded)

    async def _reply(
        self, outcome: ledger.Outcome, recorded: trace.Span | None = None
    ) -> asyncio.Future[object]:
        """Queue the send of a job's reply: to the reply topic, or for a job from the
        submissions topic to the topic it named, with its correlation id. Under the job's
        ``record`` span (when traced), a ``reply`` span goes with the reply."""
        replies = self.settings.topics.replies
        topic, headers = replies, [(JOB_ID_HEADER, str(outcome.job_id).encode())]
        route = outcome.reply_to
        if route is not None:
            headers.append((CORRELATION_ID_HEADER, route.correlation_id.encode()))
            if route.topic == replies or await self._writable(route.topic):
                topic = route.topic
        span: trace.Span | None = None
        if recorded is not None:
            span = tracing.start(
                "reply",
                trace.set_span_in_context(recorded),
                kind=trace.SpanKind.PRODUCER,
                attributes={
                    "kontext.job_id": str(outcome.job_id),
                    "messaging.system": "kafka",
                    "messaging.destination.name": topic,
                },
            )
            headers += tracing.headers_for(span)
        status: FinalStatus = "succeeded" if outcome.status == "succeeded" else "failed"
        reply = JobReply(
            job_id=outcome.job_id,
            conversation_id=outcome.conversation_id,
            tenant_id=outcome.tenant_id,
            status=status,
            result=outcome.result,
            error=ErrorInfo.model_validate(outcome.error) if outcome.error else None,
        )
        key = outcome.conversation_id.encode()
        sent: asyncio.Future[object] = await self.producer.send(
            topic, reply.encode(), key=key, headers=headers
        )
        if span is not None:
            span.end()
        return sent

    async def _writable(self, topic: str) -> bool:
        """Whether ``topic`` exists to reply on (the submissions gateway checked it; it
        may have been deleted since): a missing one is logged, never retried for ever."""
        try:
            await asyncio.wait_for(self.producer.partitions_for(topic), ROUTE_TIMEOUT_S)
            return True
        except (TimeoutError, KafkaError) as exc:
            log.warning(
                "recorder: reply topic %s unavailable (%r); replying on the default", topic, exc
            )
            return False

    async def _already_replied(self, outcomes: Sequence[ledger.Outcome]) -> set[UUID]:
        """Which of these jobs' replies are on their reply topics. A recorder that
        published a batch's replies and died before committing its offsets (or
        remembering the replies) leaves them final and unreplied; its batch comes again.
        Each topic is read from the earliest of their completions to its end: seconds of
        replies, on a path taken only after such a death or a rebalance."""
        since = min(o.completed_at or utcnow() for o in outcomes) - REPLY_CLOCK_SLACK
        wanted = {str(o.job_id).encode() for o in outcomes}
        topics = {
            o.reply_to.topic if o.reply_to else self.settings.topics.replies for o in outcomes
        }
        consumer = create_consumer(self.settings, group_id=None)
        found: set[UUID] = set()
        await consumer.start()
        try:
            parts = [
                TopicPartition(topic, p)
                for topic in sorted(topics)
                for p in consumer.partitions_for_topic(topic) or ()
            ]
            consumer.assign(parts)
            starts = await consumer.offsets_for_times(
                {tp: int(since.timestamp() * 1000) for tp in parts}
            )
            ends = await consumer.end_offsets(parts)
            left: dict[TopicPartition, int] = {}
            for tp, start in starts.items():
                if start is not None and start.offset < ends[tp]:
                    consumer.seek(tp, start.offset)
                    left[tp] = ends[tp]
            deadline = time.monotonic() + REPLY_SCAN_TIMEOUT_S
            while left and time.monotonic() < deadline:
                fetched = await consumer.getmany(*left, timeout_ms=200)
                for tp, messages in fetched.items():
                    for message in messages:
                        job_id = dict(message.headers).get(JOB_ID_HEADER)
                        if job_id in wanted:
                            found.add(UUID(job_id.decode()))
                        if message.offset + 1 >= left.get(tp, 0):
                            left.pop(tp, None)
        finally:
            await consumer.stop()
        if found:
            log.info("recorder: %d replies already published, not sent again", len(found))
        return found

    async def _mark_when_idle(self) -> None:
        """The next batch's statement remembers the replies published now; should no
        batch come for ``MARK_IDLE_S``, one statement of their own does (none while
        batches keep coming: each carries the replies of the one before)."""
        while True:
            # Every statement that remembers replies starts ``unmarked`` anew.
            pending = self.unmarked
            await asyncio.sleep(MARK_IDLE_S)
            if not self.unmarked:
                return
            if self.unmarked is pending:
                break
        try:
            await self.flush()
        except (OSError, asyncpg.PostgresError) as exc:  # the next statement carries them
            log.warning("recorder: replies not remembered yet (%s)", exc)

    async def flush(self) -> None:
        """Remember the replies published since the last statement."""
        async with self._writing:
            if not self.unmarked:
                return
            async with self.pool.acquire() as conn:
                await ledger.mark_replied(conn, self.unmarked)
            self.unmarked = {}

    async def _record(
        self,
        pairs: Sequence[tuple[Record, JobCompletion]],
        sends: list[asyncio.Future[object]],
        spans: dict[UUID, trace.Span] | None = None,
    ) -> tuple[ledger.Recorded, list[tuple[Record, JobCompletion]]]:
        """Record the batch in one statement; returns it and the completions stored.
        Each job's ``record`` span in ``spans`` (when traced) is stored with its webhook
        deliveries, whose attempts become spans under it.

        If Postgres refuses its data (a value it cannot hold, which no retry fixes),
        record each completion alone and dead-letter the ones it refuses, so one bad
        completion never stalls the partition."""
        first_delay = self.settings.webhook_retry_schedule_s[0]
        traceparents: dict[UUID, str] | None = None
        if spans:
            traceparents = {
                job_id: parent
                for job_id, span in spans.items()
                if (parent := tracing.traceparent_of(span)) is not None
            }
        try:
            async with self._writing, self.pool.acquire() as conn:
                recorded = await ledger.record(
                    conn, [done for _, done in pairs], self.unmarked, first_delay, traceparents
                )
                self.unmarked = {}
            return recorded, list(pairs)
        except UNSTORABLE:
            log.warning("recorder: batch of %d refused by Postgres; one at a time", len(pairs))
        outcomes: list[ledger.Outcome] = []
        redrive: list[JobRequest] = []
        unembedded: list[tuple[int, str]] = []
        stored: list[tuple[Record, JobCompletion]] = []
        for record, done in pairs:
            try:
                async with self._writing, self.pool.acquire() as conn:
                    alone = await ledger.record(
                        conn, [done], self.unmarked, first_delay, traceparents
                    )
                    self.unmarked = {}
            except UNSTORABLE as exc:
                reason = f"JobCompletion cannot be stored: {exc}"
                sends.append(await self.dead_letters.send(record, reason))
                continue
            outcomes += alone.outcomes
            redrive += alone.redrive
            unembedded += alone.unembedded
            stored.append((record, done))
        return ledger.Recorded(outcomes, redrive, unembedded), stored


def _record_spans(pairs: Sequence[tuple[Record, JobCompletion]]) -> dict[UUID, trace.Span]:
    """Each job's ``record`` span (the batch's statement), under the span its
    completion's ``traceparent`` names."""
    spans: dict[UUID, trace.Span] = {}
    for record, done in pairs:
        if done.job_id not in spans:
            spans[done.job_id] = tracing.start(
                "record",
                tracing.extract(record.headers),
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "kontext.job_id": str(done.job_id),
                    "kontext.status": done.status,
                    "kontext.batch_size": len(pairs),
                },
            )
    return spans


def _end_record_spans(spans: dict[UUID, trace.Span], outcomes: Sequence[ledger.Outcome]) -> None:
    """End the ``record`` spans once the statement ran: whether it finalised each job
    (a duplicate completion finds it final already)."""
    for outcome in outcomes:
        span = spans.get(outcome.job_id)
        if span is not None:
            span.set_attribute("kontext.finalised", outcome.fresh)
    for span in spans.values():
        span.end()


def _observe_e2e(outcomes: Sequence[ledger.Outcome], stored: Sequence[JobCompletion]) -> None:
    """End-to-end latency of each job this batch finalised: submission until recorded,
    by model, final status and lane."""
    fresh = {o.job_id: o for o in outcomes if o.fresh}
    now = utcnow()
    for done in stored:
        outcome = fresh.pop(done.job_id, None)
        if outcome is not None and done.submitted_at is not None:
            seconds = max((now - done.submitted_at).total_seconds(), 0.0)
            E2E_LATENCY.labels(done.model, outcome.status, outcome.priority).observe(seconds)


def groups(settings: Settings) -> list[Group]:
    return [settings.topics.group("recorder", "recorder", settings.topics.completions)]


@service("recorder", groups)
async def recorder_service(shared: Resources) -> list[Service]:
    settings = shared.settings
    [reads] = groups(settings)
    model = settings.summary_model or settings.engines[0]
    memory = MemoryKeeper(
        settings,
        shared.pool,
        shared.producer,
        await shared.embedder(),
        load_tokenizer(model, settings),
    )
    recorder = Recorder(settings, shared.pool, shared.producer, memory)
    consumer = BatchConsumer(
        shared.consumer(reads),
        recorder,
        max_size=settings.stage_batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
        tempo=FetchTempo.of(settings),
    )
    return [ConsumerService(consumer)]
