"""Routing: model aliases, and fallback behind a circuit breaker that closes by itself.

``kontext up`` serves ``tiny`` and ``null`` but runs only ``null``'s inference;
``tiny``'s inference worker is a separate process the tests stop and start
again. While it is down (no heartbeat), requests for ``tiny`` are answered by
its fallback ``null``; once it is back, they go to ``tiny`` again.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.connections import create_producer, ensure_topics
from kontext.settings import Settings
from schemas.limits import WorkerHeartbeat
from tests.conftest import START_TIMEOUT_S, Stack, stack_env, start_stack, wait_for
from workers.routing import BreakerState, CircuitBreaker, HeartbeatPublisher, Router


@dataclass
class Worker:
    """A ``kontext worker inference`` process for one model."""

    env: dict[str, str]
    cwd: Path
    process: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kontext.cli", "worker", "inference", "--engine", "tiny"],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()

        def pump(process: subprocess.Popen[str]) -> None:
            assert process.stdout is not None
            for line in process.stdout:
                self.output.append(line)
                if "Kontext ready" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, args=(self.process,), daemon=True).start()
        if not ready.wait(START_TIMEOUT_S) or self.process.poll() is not None:
            self.process.kill()
            raise RuntimeError("worker did not start:\n" + "".join(self.output[-40:]))

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


@dataclass
class Deployment:
    stack: Stack
    tiny: Worker


@pytest.fixture(scope="module")
def deployment(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> Iterator[Deployment]:
    env = stack_env(broker, database, prefix=f"rt{uuid.uuid4().hex[:8]}")
    env.update(
        KONTEXT_MODEL_ALIASES='{"fast": "tiny", "cheap": "null"}',
        KONTEXT_MODEL_FALLBACKS='{"tiny": ["null"]}',
        KONTEXT_HEARTBEAT_INTERVAL_S="0.2",
        KONTEXT_ROUTE_HEARTBEAT_TIMEOUT_S="1.5",
        KONTEXT_ROUTE_COOLDOWN_S="1",
        KONTEXT_KAFKA_SESSION_TIMEOUT_MS="2000",
    )
    tiny = Worker(env=dict(env), cwd=workdir)
    tiny.start()
    env.update(KONTEXT_ENGINES="tiny,null", KONTEXT_INFERENCE_ENGINES="null")
    try:
        stack = start_stack(["up", "--port", "0"], env, workdir)
    except BaseException:
        tiny.stop()
        raise
    yield Deployment(stack, tiny)
    tiny.stop()
    assert stack.stop() == 0, "".join(stack.output[-40:])


@pytest.fixture
async def http(deployment: Deployment) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=deployment.stack.api_url, headers=deployment.stack.headers, timeout=30
    ) as client:
        yield client


async def _submit(http: httpx.AsyncClient, model: str) -> str:
    response = await http.post(
        "/v1/jobs",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def _result(http: httpx.AsyncClient, job_id: str, wait: float = 20) -> dict[str, Any]:
    job: dict[str, Any] = (await http.get(f"/v1/jobs/{job_id}", params={"wait": wait})).json()
    return job


async def _answered_by(http: httpx.AsyncClient, model: str, wait: float) -> tuple[str, Any]:
    """Submit a job for ``model``; (who answered, routed_from), or ("", None) if it is
    not answered within ``wait`` seconds."""
    job = await _result(http, await _submit(http, model), wait)
    if job["status"] != "succeeded":
        return "", None
    result = job["result"]
    return result["model"], result["context"]["routed_from"]


def test_breaker_opens_half_opens_and_closes() -> None:
    breaker = CircuitBreaker(cooldown_s=5)
    assert breaker.update(healthy=True, now=0) is BreakerState.CLOSED
    assert breaker.update(healthy=False, now=1) is BreakerState.OPEN
    assert breaker.update(healthy=True, now=3) is BreakerState.OPEN  # cooling down
    assert breaker.update(healthy=False, now=6) is BreakerState.OPEN  # half-open, still bad
    assert breaker.update(healthy=True, now=9) is BreakerState.OPEN  # cooldown restarted at 6
    assert breaker.update(healthy=True, now=11) is BreakerState.CLOSED


async def test_alias_resolves_at_submission(http: httpx.AsyncClient) -> None:
    job = await _result(http, await _submit(http, "cheap"))
    assert job["status"] == "succeeded", job
    assert job["model"] == "null"
    assert job["result"]["model"] == "null"
    assert job["result"]["context"]["routed_from"] is None

    unknown = await http.post(
        "/v1/jobs", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "unknown_model"


async def test_fallback_while_down_and_back_after_recovery(
    deployment: Deployment, http: httpx.AsyncClient
) -> None:
    # Healthy: the alias "fast" is tiny, and tiny answers.
    assert await _answered_by(http, "fast", wait=30) == ("tiny", None)

    # tiny's workers stop: once their heartbeat is missed, null answers tiny's requests.
    assert deployment.tiny.stop() == 0
    stranded: list[str] = []

    async def falls_back() -> bool:
        job_id = await _submit(http, "tiny")
        job = await _result(http, job_id, wait=2)
        if job["status"] != "succeeded":
            stranded.append(job_id)  # routed before the breaker opened: waits for tiny
            return False
        return bool(job["result"]["model"] == "null") and (
            job["result"]["context"]["routed_from"] == "tiny"
        )

    await wait_for(falls_back, timeout=30, interval=0.1)
    assert await _answered_by(http, "tiny", wait=10) == ("null", "tiny")

    # tiny is back: after the cooldown the breaker closes and tiny answers again.
    deployment.tiny.start()

    async def routes_back() -> bool:
        return await _answered_by(http, "tiny", wait=5) == ("tiny", None)

    await wait_for(routes_back, timeout=60, interval=0.1)
    # Nothing was lost: jobs routed to tiny while it was down are answered now.
    for job_id in stranded:
        job = await _result(http, job_id, wait=30)
        assert job["status"] == "succeeded", job


async def test_lagging_model_falls_back_and_recovers(broker: EmbeddedBroker) -> None:
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=f"lag{uuid.uuid4().hex[:8]}",
        engines=["big", "small"],
        model_fallbacks={"big": ["small"]},
        route_max_lag=10,
        route_heartbeat_timeout_s=30,
        route_cooldown_s=0.5,
    )
    await ensure_topics(settings, [settings.topics.heartbeats])
    producer = create_producer(settings)
    await producer.start()
    router = Router(settings)
    following = asyncio.create_task(router.run())

    async def beat(model: str, lag: int) -> None:
        heartbeat = WorkerHeartbeat(model=model, worker_id="w1", at=time.time(), lag=lag)
        await producer.send_and_wait(
            settings.topics.heartbeats, heartbeat.encode(), key=model.encode()
        )

    try:
        await beat("small", 0)
        await beat("big", 0)
        await wait_for(lambda: ("big", "w1") in router.health.latest, timeout=20)
        assert router.choose("big") == "big"
        await beat("big", 500)  # its workers fall behind: past the bound
        await wait_for(lambda: router.choose("big") == "small", timeout=20)
        assert router.breakers["big"].state is BreakerState.OPEN
        await beat("big", 3)  # caught up: closes after the cooldown, by itself
        await wait_for(lambda: router.choose("big") == "big", timeout=20)
        assert router.breakers["big"].state is BreakerState.CLOSED
    finally:
        await router.stop()
        await following
        await producer.stop()


async def test_a_heartbeat_lost_in_a_kafka_outage_is_logged_not_left_unretrieved(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat is not awaited: one the broker never takes (it went away) is a
    warning, not asyncio's "Future exception was never retrieved" at some later
    collection (after ``Kontext stopped.``, as an operator saw it)."""
    outage = EmbeddedBroker(log_path=workdir / "outage-broker.log").start()
    settings = Settings(
        kafka_bootstrap_servers=outage.bootstrap_servers,
        topic_prefix=f"hb{uuid.uuid4().hex[:8]}",
        topic_partitions=1,
        heartbeat_interval_s=0.1,
    )
    await ensure_topics(settings, [settings.topics.heartbeats])
    # A send not delivered in a second fails (default: 40 s).
    producer = create_producer(settings, request_timeout_ms=1000)
    await producer.start()
    loop = asyncio.get_running_loop()
    unretrieved: list[str] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context["message"]))
    publisher = HeartbeatPublisher(settings, "tiny", producer, [])
    running = asyncio.create_task(publisher.run())
    try:
        await wait_for(lambda: publisher.started)
        outage.stop()
        lost = "heartbeat for tiny not delivered"
        await wait_for(lambda: lost in caplog.text, timeout=30)
    finally:
        await publisher.stop()
        await running
        await asyncio.wait_for(producer.stop(), 30)
        outage.stop()
        gc.collect()  # a lost send's future is freed here, and reported if unretrieved
        loop.set_exception_handler(None)
    assert unretrieved == []
