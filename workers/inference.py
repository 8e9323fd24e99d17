"""The inference worker: drains micro-batches of enriched requests into one engine.

Each batch is one engine call, between the policy chain's two inference hooks
(one call each per batch): ``before_engine`` may answer jobs itself (the
response cache), so they skip the engine; ``rewrite_completion`` may change
each engine result (PII redaction); ``after_engine`` may hold results (human
review), which are then not published. The rest go to the completions
topic; the batch's offsets are committed (by the consume loop) only after they
are delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from uuid import UUID

import orjson
from aiokafka import AIOKafkaProducer
from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic import ValidationError

from kontext import tracing
from kontext.connections import FetchTempo
from kontext.metrics import BATCH_SIZE, ENGINE_LATENCY, ENGINE_REQUESTS, TOKENS, observe_waits
from kontext.settings import Settings
from schemas.events import EnrichedRequest, ErrorInfo, JobCompletion, JobRequest, utcnow
from schemas.topics import LANES, Group
from workers import completions
from workers.completions import completion_for
from workers.consumer import BatchConsumer
from workers.deadletter import DeadLetters
from workers.engines import concurrent_batches
from workers.engines.base import Engine, Generation, GenerationRequest
from workers.policies.chain import PolicyChain
from workers.policies.compose import ChainParts, build_chain
from workers.records import Record
from workers.routing import HeartbeatPublisher
from workers.services import ConsumerService, Resources, Service, service

__all__ = ["BATCH_SIZE", "InferenceWorker"]

log = logging.getLogger(__name__)


UNREADABLE = ErrorInfo(
    code="unreadable_request", message="the job's enriched request cannot be read; it was not run"
)


def unrunnable(
    records: Sequence[Record], decoded: Sequence[tuple[Record, EnrichedRequest]]
) -> list[JobCompletion]:
    """A failed completion for each dead-lettered record whose job can still be told
    (its ``request`` reads), so the job ends and its client hears why."""
    good = {id(record) for record, _ in decoded}
    failed = []
    for record in records:
        if id(record) in good or record.value is None:
            continue
        try:
            request = JobRequest.model_validate(orjson.loads(record.value)["request"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValidationError):
            continue
        failed.append(JobCompletion.failure(request, UNREADABLE))
    return failed


class InferenceWorker:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        producer: AIOKafkaProducer,
        policies: PolicyChain | None = None,
    ) -> None:
        self.name = f"inference-{engine.name}"
        self.settings = settings
        self.engine = engine
        self.producer = producer
        self.policies = policies or PolicyChain([])
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        batch: dict[UUID, EnrichedRequest] = {}
        decoded = await self.dead_letters.decode(
            records, EnrichedRequest.decode, "EnrichedRequest", sends
        )
        traced = tracing.enabled()
        parents: dict[UUID, Sequence[tuple[str, bytes]]] = {}
        for record, item in decoded:
            batch.setdefault(item.request.job_id, item)
            if traced:
                parents.setdefault(item.request.job_id, record.headers)
        if len(decoded) < len(records):
            sends += await completions.publish(
                self.settings, self.producer, unrunnable(records, decoded)
            )
        items = list(batch.values())
        observe_waits("inference", [(item.enriched_at, item.request.priority) for item in items])
        answered = await self.policies.before_engine(items) if items else {}
        to_run = [item for item in items if item.request.job_id not in answered]
        batched_at = generated_at = None
        outputs: list[Generation | ErrorInfo] = []
        began = ended = 0
        if to_run:
            BATCH_SIZE.labels(self.engine.name).observe(len(to_run))
            batched_at = utcnow()
            began = tracing.now_ns() if traced else 0
            outputs = await self._generate(to_run)
            ended = tracing.now_ns() if traced else 0
            generated_at = utcnow()
        ran = [
            (
                item,
                self.policies.rewrite_completion(
                    completion_for(item, output, batched_at, generated_at)
                ),
            )
            for item, output in zip(to_run, outputs, strict=True)
        ]
        held = await self.policies.after_engine(ran) if ran else set()
        done = dict(answered)
        done.update((item.request.job_id, completion) for item, completion in ran)
        published = [done[i.request.job_id] for i in items if i.request.job_id not in held]
        headers = self._trace(items, to_run, parents, done, held, began, ended) if traced else None
        sends += await completions.publish(self.settings, self.producer, published, headers)
        if sends:
            await asyncio.gather(*sends)

    def _trace(
        self,
        items: Sequence[EnrichedRequest],
        to_run: Sequence[EnrichedRequest],
        parents: dict[UUID, Sequence[tuple[str, bytes]]],
        done: dict[UUID, JobCompletion],
        held: set[UUID],
        began: int,
        ended: int,
    ) -> dict[UUID, tracing.Headers]:
        """The batch's spans: one ``inference batch`` span for the engine call (a trace
        of its own, linked to the span of each job it carried), and per job an
        ``inference`` span in the job's trace (linked to the batch span), whose context
        goes with the job's completion. Returns those completions' headers."""
        model = self.engine.name
        batch_span: trace.Span | None = None
        if to_run:
            links = [
                trace.Link(found, {"kontext.job_id": str(item.request.job_id)})
                for item in to_run
                if (found := tracing.span_context(parents.get(item.request.job_id))) is not None
            ]
            batch_span = tracing.start(
                "inference batch",
                otel_context.Context(),
                start_time=began,
                links=links,
                attributes={"kontext.model": model, "kontext.batch_size": len(to_run)},
            )
            batch_span.end(end_time=ended)
        ran = {item.request.job_id for item in to_run}
        batch_link = [trace.Link(batch_span.get_span_context())] if batch_span else []
        headers: dict[UUID, tracing.Headers] = {}
        for item in items:
            job_id = item.request.job_id
            engine = job_id in ran
            span = tracing.start(
                "inference",
                tracing.extract(parents.get(job_id)),
                start_time=began if engine else None,
                kind=trace.SpanKind.CONSUMER,
                links=batch_link if engine else None,
                attributes={
                    "kontext.job_id": str(job_id),
                    "kontext.model": model,
                    "kontext.batch_size": len(to_run),
                    "kontext.cached": not engine,
                    "kontext.held_for_review": job_id in held,
                },
            )
            completion = done.get(job_id)
            if completion is not None and completion.usage is not None:
                span.set_attribute("kontext.prompt_tokens", completion.usage.prompt_tokens)
                span.set_attribute("kontext.completion_tokens", completion.usage.completion_tokens)
            if completion is not None and completion.error is not None:
                tracing.fail(span, completion.error.code, completion.error.message)
            span.end(end_time=ended if engine else None)
            headers[job_id] = tracing.headers_for(span)
        return headers

    async def _generate(self, items: Sequence[EnrichedRequest]) -> list[Generation | ErrorInfo]:
        """One engine call for the batch; if it fails, each item alone, so one bad
        prompt fails only its own job."""
        requests = [
            GenerationRequest(
                prompt=item.prompt,
                max_tokens=item.request.max_tokens,
                temperature=item.request.temperature,
                prompt_tokens=item.context.prompt_tokens,
            )
            for item in items
        ]
        model = self.engine.name
        started = time.perf_counter()
        try:
            generations = list(await self.engine.generate(requests))
        except Exception as exc:
            if len(requests) == 1:
                log.exception("%s: engine failed on job %s", self.name, items[0].request.job_id)
                return [ErrorInfo(code="engine_error", message=f"the engine failed: {exc}")]
        else:
            ENGINE_LATENCY.labels(model).observe(time.perf_counter() - started)
            ENGINE_REQUESTS.labels(model).inc(len(generations))
            TOKENS.labels(model, "prompt").inc(sum(g.prompt_tokens for g in generations))
            TOKENS.labels(model, "completion").inc(sum(g.completion_tokens for g in generations))
            return list(generations)
        results: list[Generation | ErrorInfo] = []
        for item in items:
            results.extend(await self._generate([item]))
        return results


def groups(settings: Settings) -> list[Group]:
    """Per served model, one group per lane."""
    found = []
    for model in settings.inference_engines or settings.engines:
        for lane in LANES:
            suffix = "" if lane == "interactive" else f"-{lane}"
            found.append(
                settings.topics.group(
                    f"inference-{model}{suffix}",
                    f"inference ({lane})",
                    settings.topics.inference(model, lane),
                    model=model,
                )
            )
    return found


@service("inference", groups)
async def inference_service(shared: Resources) -> list[Service]:
    """Per model: a worker draining both lanes into its engine, and its heartbeat."""
    settings = shared.settings
    lanes = groups(settings)
    services: list[Service] = []
    for model in settings.inference_engines or settings.engines:
        interactive, background = (shared.consumer(g) for g in lanes if g.model == model)
        worker = InferenceWorker(
            settings,
            await shared.engine(model),
            shared.producer,
            build_chain(settings, ChainParts(pool=shared.pool)),
        )
        in_flight = settings.inference_max_in_flight or concurrent_batches(model, settings)
        consumer = BatchConsumer(
            interactive,
            worker,
            background=background,
            background_share=settings.background_share,
            max_in_flight=in_flight,
            pacer=shared.pacer,
            max_size=settings.batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
            tempo=FetchTempo.of(settings),
        )
        services += [
            ConsumerService(consumer),
            HeartbeatPublisher(settings, model, shared.producer, [interactive]),
        ]
    return services
