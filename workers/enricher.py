"""The enricher: admits requests into the pipeline with their conversation's context.

Per micro-batch: one embedding call for the new messages, then one Postgres
round trip that decides each job against its tenant's limits and budget
(a refused job fails with the reason, through the completions topic, like any
failure), passes it through its conversation's order gate (one chat turn in
flight at a time) and reads its memory (recent turns, summaries, recalled older
turns). Each admitted request leaves with its prompt rendered by the model's chat
template, on its model's inference topic; the embedding recall searched with
stays in the job's row, for the recorder to store with the user's message (it is
never embedded again). The limited tenants' new state goes to the limits topic, for the
API replicas to refuse early.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaProducer
from opentelemetry import trace

from kontext import tracing
from kontext.connections import FetchTempo
from kontext.metrics import ENRICHMENT_LATENCY, observe_waits
from kontext.settings import Settings
from kontext.store import enrichment, memory
from kontext.store.enrichment import Claim, Limits
from kontext.tasks import retrieved_if_failed
from schemas.events import (
    EnrichedRequest,
    ErrorInfo,
    JobCompletion,
    JobRequest,
)
from schemas.limits import TenantLimitStatus
from schemas.topics import Group
from workers import completions
from workers.consumer import BatchConsumer
from workers.context import PromptTooLong, assemble, budget_for
from workers.deadletter import DeadLetters
from workers.embeddings import Embedder
from workers.engines import context_window, load_tokenizer, system_prompt
from workers.engines.base import ChatTokenizer
from workers.policies.limits import budget_reservation, reservation
from workers.records import Record
from workers.routing import Router
from workers.services import ConsumerService, Resources, Service, service

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """What the enricher needs of a model: its tokenizer, window and default system prompt."""

    tokenizer: ChatTokenizer
    context_window: int
    system_prompt: str

    @classmethod
    def load(cls, name: str, settings: Settings) -> ServedModel:
        return cls(load_tokenizer(name, settings), context_window(name), system_prompt(name))


def recall_query(request: JobRequest) -> str | None:
    """The text recall searches with: the last user message of a chat turn."""
    if request.kind != "chat":
        return None
    users = [m.content for m in request.messages if m.role == "user"]
    return users[-1] if users else None


class Enricher:
    name = "enricher"

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        models: Mapping[str, ServedModel],
        embedder: Embedder,
        router: Router | None = None,
    ) -> None:
        """``router`` picks a fallback model while a model is unhealthy (workers/routing.py)."""
        self.router = router
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.models = models
        self.embedder = embedder
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)
        self.published: dict[str, TenantLimitStatus] = {}
        """Each tenant's limit state as this enricher last published it."""

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        with retrieved_if_failed(sends, log, self.name):
            await self._queue(records, sends)
        if sends:
            await asyncio.gather(*sends)

    async def _queue(self, records: Sequence[Record], sends: list[asyncio.Future[object]]) -> None:
        """Decide the batch's jobs and queue their sends on ``sends``: refusals, limit
        states, and the admitted requests with their prompts."""
        requests: dict[UUID, JobRequest] = {}
        traced = tracing.enabled()
        parents: dict[UUID, Sequence[tuple[str, bytes]]] = {}
        for record, request in await self.dead_letters.decode(
            records, JobRequest.decode, "JobRequest", sends
        ):
            requests.setdefault(request.job_id, request)
            if traced:
                parents.setdefault(request.job_id, record.headers)
        if requests:
            started = time.perf_counter()
            began = tracing.now_ns() if traced else 0
            found = await self._enrich(list(requests.values()))
            spans = _admit_spans(requests, parents, found, began) if traced else {}
            for job_id, refusal in found.refused.items():
                error = ErrorInfo(code=refusal.code, message=refusal.message)
                headers = None
                if (admit_span := spans.get(job_id)) is not None:
                    headers = {job_id: tracing.headers_for(admit_span)}
                sends += await completions.publish(
                    self.settings,
                    self.producer,
                    [JobCompletion.failure(requests[job_id], error)],
                    headers,
                )
            sends += await self._publish_statuses(found.tenants)
            for job_id, context in found.contexts.items():
                enriching = None
                if (admit_span := spans.get(job_id)) is not None:
                    enriching = tracing.start("enrich", trace.set_span_in_context(admit_span))
                sends.append(await self._forward(requests[job_id], context, enriching))
                if enriching is not None:
                    enriching.end()
            admitted = [
                (requests[job_id].submitted_at, requests[job_id].priority)
                for job_id in found.contexts
            ]
            observe_waits("enrich", admitted)
            ENRICHMENT_LATENCY.observe(time.perf_counter() - started)

    async def _enrich(self, requests: Sequence[JobRequest]) -> enrichment.Enrichment:
        """One embedding call for the batch's new messages, then one Postgres round trip:
        the tenants' limits, the order gate and each admitted job's memory."""
        queries = [recall_query(r) for r in requests]
        texts = [q for q in queries if q is not None]
        background = all(r.priority == "background" for r in requests)
        vectors = iter(await self.embedder.embed(texts, background)) if texts else iter(())
        settings = self.settings
        limited = settings.policy_limits
        claims = [
            Claim(
                request.job_id,
                next(vectors) if query is not None else None,
                cost=reservation(request) if limited else 0,
                hold=budget_reservation(settings, request) if limited else 0,
            )
            for request, query in zip(requests, queries, strict=True)
        ]
        defaults = Limits(settings.default_rpm, settings.default_tpm, settings.default_token_budget)
        async with self.pool.acquire() as conn:
            return await enrichment.enrich(
                conn,
                claims,
                time.time(),
                defaults if limited else None,
                settings.context_turns,
                settings.recall_k,
                settings.ordering_lease_s,
            )

    async def _publish_statuses(
        self, statuses: Sequence[TenantLimitStatus]
    ) -> list[asyncio.Future[object]]:
        """Tenants' limit state for the API replicas to refuse early, when it changed."""
        sends: list[asyncio.Future[object]] = []
        for status in statuses:
            if self.published.get(status.tenant_id) == status:
                continue
            self.published[status.tenant_id] = status
            sends.append(
                await self.producer.send(
                    self.settings.topics.limits, status.encode(), key=status.tenant_id.encode()
                )
            )
        return sends

    async def _forward(
        self,
        request: JobRequest,
        context: memory.MemoryContext,
        span: trace.Span | None = None,
    ) -> asyncio.Future[object]:
        """Publish the request with its prompt; ``span`` (the job's ``enrich`` span, when
        traced) gets what went into the prompt, and goes with it as its parent."""
        topics = self.settings.topics
        key = request.conversation_id.encode()
        asked = request.model
        if self.router is not None and (chosen := self.router.choose(asked)) != asked:
            request = request.model_copy(update={"model": chosen})
        served = self.models.get(request.model)
        try:
            if served is None:
                raise LookupError(f"model {request.model!r} is not served by this deployment")
            budget = budget_for(request, served.context_window, self.settings.context_budget_tokens)
            system = self.settings.system_prompt or served.system_prompt
            assembled = assemble(request, context, served.tokenizer, budget, system)
        except (LookupError, PromptTooLong) as exc:
            code = "unknown_model" if isinstance(exc, LookupError) else "prompt_too_long"
            error = ErrorInfo(code=code, message=str(exc).strip("'\""))
            traced = None
            if span is not None:
                tracing.fail(span, code, error.message)
                traced = {request.job_id: tracing.headers_for(span)}
            [failed] = await completions.publish(
                self.settings, self.producer, [JobCompletion.failure(request, error)], traced
            )
            return failed
        enriched = EnrichedRequest(
            request=request,
            prompt=assembled.prompt,
            context=assembled.context
            if asked == request.model
            else assembled.context.model_copy(update={"routed_from": asked}),
            new_turns=assembled.new_turns,
        )
        headers: tracing.Headers | None = None
        if span is not None:
            _describe(span, enriched)
            headers = tracing.headers_for(span)
        future: asyncio.Future[object] = await self.producer.send(
            topics.inference(request.model, request.priority),
            enriched.encode(),
            key=key,
            headers=headers,
        )
        return future


def _admit_spans(
    requests: Mapping[UUID, JobRequest],
    parents: Mapping[UUID, Sequence[tuple[str, bytes]]],
    found: enrichment.Enrichment,
    began: int,
) -> dict[UUID, trace.Span]:
    """Each job's ``admit`` span, ended: the batch's round trip (limits, order gate,
    memory), under the span its request's ``traceparent`` names."""
    spans = {}
    for job_id, request in requests.items():
        span = tracing.start(
            "admit",
            tracing.extract(parents.get(job_id)),
            start_time=began,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "kontext.job_id": str(job_id),
                "kontext.tenant_id": request.tenant_id,
                "kontext.batch_size": len(requests),
            },
        )
        context = found.contexts.get(job_id)
        refusal = found.refused.get(job_id)
        if refusal is not None:
            tracing.fail(span, refusal.code, refusal.message)
        elif context is not None:
            span.set_attribute("kontext.admit.recent_turns", len(context.recent))
            span.set_attribute("kontext.admit.recalled", len(context.recalled))
            span.set_attribute("kontext.admit.summaries", len(context.summaries))
        else:
            # Final already, or waiting behind its conversation's turn in flight.
            span.set_attribute("kontext.admit.held", True)
        span.end()
        spans[job_id] = span
    return spans


def _describe(span: trace.Span, enriched: EnrichedRequest) -> None:
    """What went into a job's prompt, as its ``enrich`` span's attributes."""
    info = enriched.context
    span.set_attribute("kontext.job_id", str(enriched.request.job_id))
    span.set_attribute("kontext.model", enriched.request.model)
    span.set_attribute("kontext.prompt_tokens", info.prompt_tokens)
    if info.budget_tokens is not None:
        span.set_attribute("kontext.budget_tokens", info.budget_tokens)
    span.set_attribute("kontext.turns_used", len(info.turns))
    span.set_attribute("kontext.summaries_used", len(info.summaries))
    span.set_attribute("kontext.memories_recalled", len(info.memories))
    span.set_attribute("kontext.truncated", info.truncated)
    if info.routed_from is not None:
        span.set_attribute("kontext.routed_from", info.routed_from)


def groups(settings: Settings) -> list[Group]:
    """One stream processor per lane: a backfill waiting to be enriched never holds up
    an interactive turn."""
    topics = settings.topics
    return [
        topics.group("enricher", "enricher", topics.requests),
        topics.group(
            "enricher-background", "enricher (background)", topics.requests_lane("background")
        ),
    ]


@service("enricher", groups)
async def enricher_service(shared: Resources) -> list[Service]:
    """One stream processor per lane over one handler, on the configured runtime."""
    settings = shared.settings
    models = {model: ServedModel.load(model, settings) for model in settings.engines}
    router = Router(settings)
    handler = Enricher(
        settings, shared.pool, shared.producer, models, await shared.embedder(), router=router
    )
    lanes: list[Service] = []
    for lane in groups(settings):
        if settings.stream_runtime == "faust":
            from workers.streams import StreamProcessor, StreamService  # faust only if chosen

            lanes.append(StreamService(StreamProcessor(settings, lane, handler)))
            continue
        consumer = BatchConsumer(
            shared.consumer(lane),
            handler,
            max_size=settings.stage_batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
            tempo=FetchTempo.of(settings),
        )
        lanes.append(ConsumerService(consumer))
    return [router, *lanes]
