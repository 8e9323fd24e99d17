"""The inference worker: drains micro-batches of enriched requests into one engine.

Each batch is one engine call, between the policy chain's inference hooks.
``before_engine`` (once per batch) may answer jobs itself (the response cache):
they skip the engine, and their completions go out at once. ``rewrite_completion``
may change each engine result (PII redaction); ``after_engine`` may hold results
(human review), which are then not published. An engine that batches
continuously (``ContinuousEngine``) hands each answer over as its request ends:
those that end together go through ``after_engine`` (one call) and out to the
completions topic at once, without waiting for the rest of the batch. The
batch's offsets are committed (by the consume loop) only after all of them are
delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import NamedTuple, TypeVar
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
from kontext.tasks import retrieved_if_failed
from schemas.events import EnrichedRequest, ErrorInfo, JobCompletion, JobRequest, utcnow
from schemas.topics import LANES, Group
from workers import completions
from workers.completions import completion_for
from workers.consumer import BatchConsumer
from workers.deadletter import DeadLetters
from workers.engines import concurrent_batches
from workers.engines.base import ContinuousEngine, Engine, Generation, GenerationRequest
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


_Result = TypeVar("_Result", Generation, "asyncio.Task[Generation]")
"""What one engine request gives: its answer, or the task that will."""


def _engine_error(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(code="engine_error", message=f"the engine failed: {exc}")


class _Call(NamedTuple):
    """An engine call, for its jobs' spans: its own span, its start, its jobs."""

    span: trace.Span
    began: int
    size: int


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
        with retrieved_if_failed(sends, log, self.name):
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
            observe_waits(
                "inference", [(item.enriched_at, item.request.priority) for item in items]
            )
            answered = await self.policies.before_engine(items) if items else {}
            if answered:
                cached = [
                    (item, answered[item.request.job_id])
                    for item in items
                    if item.request.job_id in answered
                ]
                headers = self._job_spans(cached, parents, set()) if traced else None
                sends += await completions.publish(
                    self.settings, self.producer, [done for _, done in cached], headers
                )
            to_run = [item for item in items if item.request.job_id not in answered]
            if to_run:
                sends += await self._run(to_run, parents if traced else None)
        if sends:
            await asyncio.gather(*sends)

    async def _run(
        self,
        items: Sequence[EnrichedRequest],
        parents: dict[UUID, Sequence[tuple[str, bytes]]] | None,
    ) -> list[asyncio.Future[object]]:
        """Run ``items`` through the engine, and publish the answers as they come:
        each as soon as it is done with an engine that batches continuously, else all
        at the call's end. ``parents``: the jobs' trace contexts, when traced."""
        BATCH_SIZE.labels(self.engine.name).observe(len(items))
        batched_at = utcnow()
        call = None
        if parents is not None:
            began = tracing.now_ns()
            call = _Call(self._batch_span(items, parents, began), began, len(items))
        sends: list[asyncio.Future[object]] = []
        try:
            async with contextlib.aclosing(self._answers(items)) as answers:
                async for outputs in answers:
                    generated_at = utcnow()
                    ran = [
                        (
                            item,
                            self.policies.rewrite_completion(
                                completion_for(item, output, batched_at, generated_at)
                            ),
                        )
                        for item, output in outputs
                    ]
                    held = await self.policies.after_engine(ran)
                    headers = None
                    if parents is not None:
                        headers = self._job_spans(ran, parents, held, call)
                    published = [done for item, done in ran if item.request.job_id not in held]
                    sends += await completions.publish(
                        self.settings, self.producer, published, headers
                    )
        finally:
            if call is not None:
                call.span.end()
        return sends

    async def _answers(
        self, items: Sequence[EnrichedRequest]
    ) -> AsyncGenerator[Sequence[tuple[EnrichedRequest, Generation | ErrorInfo]]]:
        """The engine's answers to ``items``, in groups as they are done: those that
        end together, with an engine that batches continuously; else the whole batch.
        The call's time is observed when its last answer is in."""
        engine = self.engine
        started = time.perf_counter()
        latency = ENGINE_LATENCY.labels(engine.name)
        if not isinstance(engine, ContinuousEngine):
            outputs = await self._batch_or_each(items, engine.generate)
            latency.observe(time.perf_counter() - started)
            self._count(outputs)
            yield list(zip(items, outputs, strict=True))
            return
        pending: dict[asyncio.Task[Generation], EnrichedRequest] = {}
        failed: list[tuple[EnrichedRequest, Generation | ErrorInfo]] = []
        for item, begun in zip(
            items, await self._batch_or_each(items, engine.generate_each), strict=True
        ):
            if isinstance(begun, ErrorInfo):
                failed.append((item, begun))
            else:
                pending[begun] = item
        try:
            if failed:
                yield failed
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                group: list[tuple[EnrichedRequest, Generation | ErrorInfo]] = []
                for task in done:
                    item = pending.pop(task)
                    group.append((item, self._outcome(task, item)))
                if not pending:
                    latency.observe(time.perf_counter() - started)
                self._count([output for _, output in group])
                yield group
        finally:
            for task in pending:
                task.cancel()

    def _outcome(
        self, task: asyncio.Task[Generation], item: EnrichedRequest
    ) -> Generation | ErrorInfo:
        exc = task.exception()
        if exc is None:
            return task.result()
        log.error("%s: engine failed on job %s", self.name, item.request.job_id, exc_info=exc)
        return _engine_error(exc)

    def _count(self, outputs: Sequence[Generation | ErrorInfo]) -> None:
        """The engine's request and token counters, for the answers it gave."""
        model = self.engine.name
        generations = [g for g in outputs if isinstance(g, Generation)]
        ENGINE_REQUESTS.labels(model).inc(len(generations))
        TOKENS.labels(model, "prompt").inc(sum(g.prompt_tokens for g in generations))
        TOKENS.labels(model, "completion").inc(sum(g.completion_tokens for g in generations))

    def _batch_span(
        self,
        items: Sequence[EnrichedRequest],
        parents: dict[UUID, Sequence[tuple[str, bytes]]],
        began: int,
    ) -> trace.Span:
        """The ``inference batch`` span of the engine call: a trace of its own, linked
        to the span of each job it carries. End it when the call's last answer is in."""
        links = [
            trace.Link(found, {"kontext.job_id": str(item.request.job_id)})
            for item in items
            if (found := tracing.span_context(parents.get(item.request.job_id))) is not None
        ]
        return tracing.start(
            "inference batch",
            otel_context.Context(),
            start_time=began,
            links=links,
            attributes={"kontext.model": self.engine.name, "kontext.batch_size": len(items)},
        )

    def _job_spans(
        self,
        done: Sequence[tuple[EnrichedRequest, JobCompletion]],
        parents: dict[UUID, Sequence[tuple[str, bytes]]],
        held: set[UUID],
        call: _Call | None = None,
    ) -> dict[UUID, tracing.Headers]:
        """Per job an ``inference`` span in the job's trace, ending now: from the start
        of its engine ``call`` (whose span it links to), or for a job answered without
        the engine, a span of its own moment. Returns the headers that carry each span
        on with the job's completion."""
        links = [trace.Link(call.span.get_span_context())] if call else None
        headers: dict[UUID, tracing.Headers] = {}
        for item, completion in done:
            job_id = item.request.job_id
            span = tracing.start(
                "inference",
                tracing.extract(parents.get(job_id)),
                start_time=call.began if call else None,
                kind=trace.SpanKind.CONSUMER,
                links=links,
                attributes={
                    "kontext.job_id": str(job_id),
                    "kontext.model": self.engine.name,
                    "kontext.batch_size": call.size if call else 0,
                    "kontext.cached": call is None,
                    "kontext.held_for_review": job_id in held,
                },
            )
            if completion.usage is not None:
                span.set_attribute("kontext.prompt_tokens", completion.usage.prompt_tokens)
                span.set_attribute("kontext.completion_tokens", completion.usage.completion_tokens)
            if completion.error is not None:
                tracing.fail(span, completion.error.code, completion.error.message)
            span.end()
            headers[job_id] = tracing.headers_for(span)
        return headers

    @staticmethod
    def _request(item: EnrichedRequest) -> GenerationRequest:
        return GenerationRequest(
            prompt=item.prompt,
            max_tokens=item.request.max_tokens,
            temperature=item.request.temperature,
            top_p=item.request.top_p,
            stop=tuple(item.request.stop),
            logprobs=item.request.logprobs,
            prompt_tokens=item.context.prompt_tokens,
            background=item.request.priority == "background",
        )

    async def _batch_or_each(
        self,
        items: Sequence[EnrichedRequest],
        call: Callable[[list[GenerationRequest]], Awaitable[Sequence[_Result]]],
    ) -> list[_Result | ErrorInfo]:
        """``call`` on the whole batch (the engine's ``generate``, or ``generate_each``,
        which starts it); if that fails, on each item alone, so one bad prompt fails
        only its own job."""
        try:
            return list(await call([self._request(item) for item in items]))
        except Exception as exc:
            if len(items) == 1:
                log.exception("%s: engine failed on job %s", self.name, items[0].request.job_id)
                return [_engine_error(exc)]
        results: list[_Result | ErrorInfo] = []
        for item in items:
            results += await self._batch_or_each([item], call)
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
