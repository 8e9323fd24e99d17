"""Tracing against a real stack: ``kontext up`` exporting over OTLP/HTTP to a local
receiver that decodes the protobuf (opentelemetry-proto), and each job's timeline
through the API and on the dashboard (Debian's Chromium, driven by Playwright).

With ``KONTEXT_WATERFALL_SCREENSHOT=PATH`` the dashboard's waterfall is saved to PATH
(docs/waterfall.png)."""

from __future__ import annotations

import asyncio
import gzip
import os
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from playwright import async_api as playwright_api

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.store import keys
from tests.conftest import Stack, own_database, stack_env, start_stack, wait_for
from tests.receiver import Receiver, listening, serving

TIMEOUT_S = 90.0
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
SCREENSHOT = os.environ.get("KONTEXT_WATERFALL_SCREENSHOT")
"""Where to save the dashboard's waterfall of the test's job (docs/waterfall.png)."""
STAGES = ("accepted", "admitted", "enriched", "batched", "generated", "recorded", "replied")


@dataclass(frozen=True)
class Received:
    """One span as the exporter sent it."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    service: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    """(trace id, span id) of each linked span."""


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver: every span of every export request."""

    url: str = ""
    spans: list[Received] = field(default_factory=list)
    requests: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        self.requests += 1
        for resource in export.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource.scope_spans:
                self.spans.extend(_received(span, service) for span in scope.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def trace(self, trace_id: str) -> list[Received]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, trace_id: str, name: str) -> list[Received]:
        return [s for s in self.trace(trace_id) if s.name == name]

    def one(self, trace_id: str, name: str) -> Received:
        found = self.named(trace_id, name)
        assert len(found) == 1, (name, found)
        return found[0]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _received(span: ProtoSpan, service: str) -> Received:
    return Received(
        name=span.name,
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        kind=span.kind,
        service=service,
        attributes={a.key: _value(a.value) for a in span.attributes},
        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
    )


@asynccontextmanager
async def collecting() -> AsyncIterator[Collector]:
    collector = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.handle)
    async with listening(app) as url:
        collector.url = url
        yield collector


@dataclass
class Traced:
    stack: Stack
    collector: Collector
    hooks: Receiver
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="module")
async def traced(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> AsyncIterator[Traced]:
    """A stack of its own that exports every span to a local OTLP receiver, on a
    database of its own (another stack's webhook dispatcher would deliver its jobs'
    webhooks otherwise, untraced)."""
    url = await own_database(database)
    async with collecting() as collector, serving() as hooks:
        env = stack_env(broker, database, prefix=f"tr{uuid.uuid4().hex[:8]}")
        env.update(
            DATABASE_URL=url,
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
            OTEL_TRACES_SAMPLER="parentbased_always_on",
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        stack = await asyncio.to_thread(
            start_stack, ["up", "--engine", "tiny", "--port", "0"], env, workdir
        )
        conn = await asyncpg.connect(url)
        try:
            key = (await keys.create(conn, f"traced-{uuid.uuid4().hex[:8]}")).key
        finally:
            await conn.close()
        try:
            yield Traced(stack, collector, hooks, key)
        finally:
            code = await asyncio.to_thread(stack.stop)
        assert code == 0, "".join(stack.output[-40:])


def _traceparent() -> tuple[str, str, str]:
    """A client's own trace: (trace id, span id, traceparent header)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


async def _submit(
    http: httpx.AsyncClient, traceparent: str, text: str, webhook: str | None = None
) -> str:
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
    }
    if webhook is not None:
        body["webhook"] = {"url": webhook}
    submitted = await http.post("/v1/jobs", json=body, headers={"traceparent": traceparent})
    assert submitted.status_code == 202, submitted.text
    job_id: str = submitted.json()["id"]
    job = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()
    assert job["status"] == "succeeded", job
    return job_id


JOB_STAGES = ("submit", "admit", "enrich", "inference", "record", "reply")


def _assert_job_chain(collector: Collector, trace_id: str, first_parent: str) -> Received:
    """Each stage's span is the child of the previous hop's; returns the enrich span."""
    parent = first_parent
    spans = {}
    for name in JOB_STAGES:
        span = collector.one(trace_id, name)
        assert span.parent_id == parent, (name, span, parent)
        spans[name] = span
        parent = span.span_id
    job_ids = {s.attributes["kontext.job_id"] for s in spans.values()}
    assert len(job_ids) == 1, job_ids
    return spans["enrich"]


async def test_one_chat_job_is_one_trace_across_every_stage(traced: Traced) -> None:
    trace_id, client_span, traceparent = _traceparent()
    async with httpx.AsyncClient(
        base_url=traced.stack.api_url, headers=traced.headers, timeout=TIMEOUT_S
    ) as http:
        job_id = await _submit(http, traceparent, "Hello, trace me.", traced.hooks.hook("traced"))
    collector = traced.collector

    def complete() -> bool:
        names = {s.name for s in collector.trace(trace_id)}
        return {*JOB_STAGES, "webhook delivery"} <= names and bool(_batches_of(collector, trace_id))

    try:
        await wait_for(complete, timeout=TIMEOUT_S)
    except AssertionError:
        seen = sorted({s.name for s in collector.trace(trace_id)})
        raise AssertionError(
            f"spans of the job's trace: {seen}; batch spans linking it: "
            f"{len(_batches_of(collector, trace_id))}"
        ) from None
    # The API's request span continues the client's trace; the job's stages follow it.
    [request] = [s for s in collector.trace(trace_id) if s.kind == ProtoSpan.SPAN_KIND_SERVER]
    assert request.parent_id == client_span
    assert request.attributes.get("http.route") == "/v1/jobs"
    enrich = _assert_job_chain(collector, trace_id, request.span_id)
    assert enrich.attributes["kontext.job_id"] == job_id
    assert enrich.attributes["kontext.prompt_tokens"] > 0
    assert enrich.attributes["kontext.turns_used"] == 0
    assert enrich.attributes["kontext.memories_recalled"] == 0
    # The engine call: a batch span linking to the job, linked back from its stage span.
    [batch] = _batches_of(collector, trace_id)
    assert (trace_id, enrich.span_id) in batch.links
    assert batch.attributes["kontext.batch_size"] >= 1
    inference = collector.one(trace_id, "inference")
    assert (batch.trace_id, batch.span_id) in inference.links
    # The webhook attempt is a span of the job's trace, under its record span, and the
    # receiver got its traceparent.
    record = collector.one(trace_id, "record")
    [delivery] = collector.named(trace_id, "webhook delivery")
    assert delivery.parent_id == record.span_id
    assert delivery.attributes["http.response.status_code"] == 204
    [call] = traced.hooks.calls["traced"]
    assert call.headers["traceparent"] == f"00-{trace_id}-{delivery.span_id}-01"


def _batches_of(collector: Collector, trace_id: str) -> list[Received]:
    """The inference batch spans linking to a span of ``trace_id``."""
    return [
        s
        for s in collector.spans
        if s.name == "inference batch" and any(t == trace_id for t, _ in s.links)
    ]


async def test_a_batch_span_links_every_job_it_carried(traced: Traced) -> None:
    traces = [_traceparent() for _ in range(4)]
    async with httpx.AsyncClient(
        base_url=traced.stack.api_url, headers=traced.headers, timeout=TIMEOUT_S
    ) as http:
        await asyncio.gather(
            *(
                _submit(http, parent, f"Job {n} of a burst.")
                for n, (_, _, parent) in enumerate(traces)
            )
        )
    collector = traced.collector

    def linked() -> bool:
        return all(
            collector.named(t, "inference") and collector.named(t, "enrich") for t, _, _ in traces
        )

    await wait_for(linked, timeout=TIMEOUT_S)
    # Each job's stage span links to the batch span of the engine call that ran it.
    batch_of = {t: collector.one(t, "inference").links[0][1] for t, _, _ in traces}

    def exported() -> bool:
        return set(batch_of.values()) <= {s.span_id for s in collector.spans}

    await wait_for(exported, timeout=TIMEOUT_S)
    batches = {s.span_id: s for s in collector.spans if s.name == "inference batch"}
    for trace_id, batch_id in batch_of.items():
        batch = batches[batch_id]
        # The batch links every job it carried: this one among them.
        assert (trace_id, collector.one(trace_id, "enrich").span_id) in batch.links
        assert len(batch.links) == batch.attributes["kontext.batch_size"]


async def test_a_kafka_submission_continues_its_trace(traced: Traced) -> None:
    trace_id, client_span, traceparent = _traceparent()
    producer = AIOKafkaProducer(bootstrap_servers=traced.stack.settings.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            traced.stack.settings.topics.submissions,
            b'{"model": "tiny", "messages": [{"role": "user", "content": "Via Kafka."}],'
            b' "max_tokens": 4}',
            headers=[
                ("authorization", f"Bearer {traced.key}".encode()),
                ("correlation-id", uuid.uuid4().hex.encode()),
                ("traceparent", traceparent.encode()),
            ],
        )
    finally:
        await producer.stop()
    collector = traced.collector
    await wait_for(lambda: collector.named(trace_id, "reply"), timeout=TIMEOUT_S)
    receive = collector.one(trace_id, "submissions receive")
    assert receive.parent_id == client_span
    assert receive.kind == ProtoSpan.SPAN_KIND_CONSUMER
    _assert_job_chain(collector, trace_id, receive.span_id)


async def _timeline(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    job = (await http.get(f"/v1/jobs/{job_id}", params={"timeline": "true"})).json()
    timeline: dict[str, Any] = job["timeline"]
    return timeline


async def test_timeline_of_a_finished_job_is_complete_and_ordered(traced: Traced) -> None:
    _, _, traceparent = _traceparent()
    async with httpx.AsyncClient(
        base_url=traced.stack.api_url, headers=traced.headers, timeout=TIMEOUT_S
    ) as http:
        plain = (await http.get("/v1/jobs/" + str(uuid.uuid4()))).status_code
        assert plain == 404
        job_id = await _submit(http, traceparent, "Time me.", traced.hooks.hook("timed"))
        without = (await http.get(f"/v1/jobs/{job_id}")).json()
        assert without["timeline"] is None

        async def settled() -> bool:
            timeline = await _timeline(http, job_id)
            return all(timeline[k] for k in (*STAGES, "delivered"))

        await wait_for(settled, timeout=TIMEOUT_S)
        timeline = await _timeline(http, job_id)
    at = {name: datetime.fromisoformat(value) for name, value in timeline.items()}
    reached = [at[name] for name in STAGES]
    assert reached == sorted(reached), timeline
    assert at["delivered"] >= at["recorded"], timeline


@pytest.fixture(scope="module")
def chromium() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="kontext-chromium-") as profile:
        yield profile


async def test_dashboard_draws_a_jobs_waterfall(traced: Traced, chromium: str) -> None:
    _, _, traceparent = _traceparent()
    async with httpx.AsyncClient(
        base_url=traced.stack.api_url, headers=traced.headers, timeout=TIMEOUT_S
    ) as http:
        job_id = await _submit(
            http, traceparent, "Draw my waterfall.", traced.hooks.hook("waterfall")
        )

        async def settled() -> bool:
            timeline = await _timeline(http, job_id)
            return all(timeline[k] for k in (*STAGES, "delivered"))

        await wait_for(settled, timeout=TIMEOUT_S)
        timeline = await _timeline(http, job_id)
    async with playwright_api.async_playwright() as driver:
        context = await driver.chromium.launch_persistent_context(
            chromium,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 1000},
        )
        try:
            page = await context.new_page()
            await page.goto(f"{traced.stack.api_url}/dashboard#key={traced.key}")
            await page.fill("#job-id", job_id)
            await page.click("#open-job button")
            table = page.locator(f"table.waterfall[data-job='{job_id}']")
            await table.wait_for(timeout=30_000)
            for stage in (*STAGES, "delivered"):
                row = table.locator(f"tr[data-stage='{stage}']")
                assert await row.get_attribute("data-reached") == "true", stage
                shown = await row.get_attribute("data-at")
                assert shown is not None
                assert datetime.fromisoformat(shown) == datetime.fromisoformat(timeline[stage])
                assert await row.locator(".wf-bar > span").count() == 1
            if SCREENSHOT:
                await page.locator("#job-timeline").screenshot(path=SCREENSHOT)
        finally:
            await context.close()
