"""Prometheus metrics: the API's ``/metrics`` shows every stage of a job, and a worker
run on its own serves the same registry on its metrics port."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from kontext import metrics
from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from producers.backfill import create_batch
from tests.conftest import Stack, stack_env, start_stack, wait_for
from tests.scrape import Scrape, scrape

MODEL = "tiny"
LAG = "kontext_consumer_lag"


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=stack.headers, timeout=90
    ) as client:
        yield client


def _grew(before: Scrape, after: Scrape, sample: str, **labels: str) -> float:
    return after.value(sample, **labels) - before.value(sample, **labels)


async def test_a_job_moves_every_stage_metric(stack: Stack, http: httpx.AsyncClient) -> None:
    before = await scrape(stack)
    submitted = await http.post(
        "/v1/jobs",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": f"metrics {uuid.uuid4().hex}"}],
            "max_tokens": 8,
        },
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    view = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()
    assert view["status"] == "succeeded", view
    assert (await http.get("/no/such/route")).status_code == 404

    async def lag_set() -> bool:  # each consumer sets its lag once its batch is through
        consumers = {labels["consumer"] for labels in (await scrape(stack)).labels(LAG)}
        return {"recorder", f"inference-{MODEL}"} <= consumers

    await wait_for(lag_set, timeout=30, interval=0.1)
    after = await scrape(stack)

    # API requests by route template, method and status; and their latency.
    assert _grew(before, after, "kontext_http_requests_total", route="/v1/jobs", method="POST",
                 status="202") == 1  # fmt: skip
    assert _grew(before, after, "kontext_http_requests_total", route="unmatched",
                 status="404") >= 1  # fmt: skip
    assert (
        _grew(
            before, after, "kontext_http_request_duration_seconds_count", route="/v1/jobs/{job_id}"
        )
        >= 1
    )
    # Each stage of the pipeline.
    for stage in ("enrich", "inference"):
        waits = _grew(
            before, after, "kontext_queue_wait_seconds_count", stage=stage, lane="interactive"
        )
        assert waits >= 1
    assert _grew(before, after, "kontext_enrichment_duration_seconds_count") >= 1
    assert _grew(before, after, "kontext_engine_duration_seconds_count", model=MODEL) >= 1
    assert _grew(before, after, "kontext_inference_batch_size_count", model=MODEL) >= 1
    e2e = _grew(
        before,
        after,
        "kontext_job_duration_seconds_count",
        model=MODEL,
        status="succeeded",
        lane="interactive",
    )
    assert e2e >= 1
    assert _grew(before, after, "kontext_job_duration_seconds_sum", model=MODEL) > 0
    # Tokens (tokens/s is their rate) and the cache's lookups (a first ask: a miss).
    completion_tokens = view["result"]["usage"]["completion_tokens"]
    assert _grew(before, after, "kontext_tokens_total", model=MODEL, kind="completion") >= (
        completion_tokens
    )
    assert _grew(before, after, "kontext_tokens_total", model=MODEL, kind="prompt") > 0
    assert _grew(before, after, "kontext_cache_lookups_total", model=MODEL, result="miss") >= 1
    # Consumer lag of the consumers this job passed, by topic and partition.
    lag = after.labels(LAG)
    completions = stack.settings.topics.completions
    assert any(labels["topic"] == completions for labels in lag)
    assert all(after.value(LAG, **labels) >= 0 for labels in lag)  # never negative


async def test_end_to_end_latency_is_split_by_lane(stack: Stack, http: httpx.AsyncClient) -> None:
    # A batch line's wait behind its backfill never mixes into interactive latency:
    # each lane is its own series, and its own row on the dashboard.
    before = await scrape(stack)
    line = {
        "custom_id": "lane",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "lane"}]},
    }
    created = await create_batch(http, orjson.dumps(line))
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]

    async def completed() -> bool:
        batch = (await http.get(f"/v1/batches/{batch_id}")).json()
        return bool(batch["status"] == "completed")

    await wait_for(completed, timeout=60, interval=0.2)
    after = await scrape(stack)
    count = "kontext_job_duration_seconds_count"
    assert _grew(before, after, count, model=MODEL, lane="background") == 1

    overview = (await http.get("/dashboard/api/overview", headers=stack.operator_headers)).json()
    stages = {row["stage"] for row in overview["latency"]}
    assert f"end to end ({MODEL}, background)" in stages, stages


async def test_a_dead_letter_is_counted_by_topic_and_reason(stack: Stack) -> None:
    topic = stack.settings.topics.requests
    labels = {"topic": topic, "consumer": "enricher", "reason": "invalid_jobrequest"}
    before = (await scrape(stack)).value("kontext_dead_letters_total", **labels)
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"not json", key=b"metrics-dead-letter")
    finally:
        await producer.stop()

    async def counted() -> bool:
        now = (await scrape(stack)).value("kontext_dead_letters_total", **labels)
        return now == before + 1

    await wait_for(counted, timeout=30, interval=0.2)


async def test_the_apis_metrics_need_an_operator_key(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=stack.headers)).status_code == 403
        response = await http.get("/metrics", headers=stack.operator_headers)
    assert response.status_code == 200
    assert "kontext_inference_batch_size_bucket" in response.text


async def test_a_standalone_worker_serves_metrics_on_its_port() -> None:
    port = metrics.serve(0, "127.0.0.1")
    assert port is not None
    metrics.DEAD_LETTERS.labels("t", "c", "standalone_probe").inc()
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    scraped = Scrape(response.text)
    assert scraped.value("kontext_dead_letters_total", reason="standalone_probe") == 1
    assert metrics.serve(None) is None


def test_reason_codes_are_bounded_labels() -> None:
    assert metrics.reason_code(f"JobCompletion for unknown job {uuid.uuid4()}") == (
        "jobcompletion_for_unknown_job"
    )
    assert metrics.reason_code("invalid JobRequest: 1 validation error") == "invalid_jobrequest"
    assert metrics.reason_code("") == "other"


async def test_up_with_child_processes_names_where_each_serves_its_metrics(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> None:
    """``--process``: each child serves its own registry, at the address ``kontext up``
    prints once ready; the inference child's shows the engine's calls."""
    env = stack_env(broker, database, f"m{uuid.uuid4().hex[:8]}")
    stack = start_stack(
        ["up", "--engine", "tiny", "--port", "0", "--process", "enricher,inference,recorder"],
        env,
        workdir,
    )
    try:
        [line] = [
            line for line in stack.output if line.startswith("Metrics of enricher, inference")
        ]
        url = line.rsplit(" ", 1)[-1].strip()
        async with httpx.AsyncClient(
            base_url=stack.api_url, headers=stack.headers, timeout=90
        ) as http:
            submitted = await http.post(
                "/v1/jobs",
                json={
                    "model": MODEL,
                    # Never asked before: the response cache cannot answer it.
                    "messages": [{"role": "user", "content": f"hi {uuid.uuid4().hex}"}],
                },
            )
            view = await http.get(f"/v1/jobs/{submitted.json()['id']}", params={"wait": 60})
            assert view.json()["status"] == "succeeded", view.text
            scraped = Scrape((await http.get(url)).text)
        assert scraped.value("kontext_engine_duration_seconds_count", model=MODEL) >= 1
    finally:
        assert stack.stop() == 0, "".join(stack.output[-40:])
