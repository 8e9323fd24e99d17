"""Shared fixtures: one real Tansu broker and one real PostgreSQL for the session,
and a ``kontext up`` process serving the ``tiny`` and ``smollm2`` models on them."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.connections import create_pool, ensure_topics
from kontext.migrate import upgrade
from kontext.settings import Settings
from kontext.store import keys
from producers.client import KontextClient
from schemas.events import EnrichedRequest, JobCompletion
from workers.engines.base import Engine
from workers.inference import InferenceWorker
from workers.policies.chain import PolicyChain
from workers.records import Record

READY = re.compile(r"Kontext ready: API (http://[0-9.]+:\d+)")
DEV_KEY = re.compile(r"Dev API key \(tenant default\): (kx_\S+)")
START_TIMEOUT_S = 180
# The deployment's webhook secrets during a rotation: every delivery is signed with both.
WEBHOOK_SECRETS = (
    "whsec_a29udGV4dC10ZXN0LXdlYmhvb2stc2VjcmV0LW9sZCE=",
    "whsec_a29udGV4dC10ZXN0LXdlYmhvb2stc2VjcmV0LW5ldyE=",
)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    # Outside the root user's home: embedded Postgres opens traversal on every parent.
    path = Path(tempfile.mkdtemp(prefix="kontext-tests-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def broker(workdir: Path) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def database(workdir: Path) -> Iterator[EmbeddedPostgres]:
    database = EmbeddedPostgres(workdir / "postgres").start()
    upgrade(database.url)
    yield database
    database.destroy()


def embedded_env() -> dict[str, str]:
    """This environment without its broker, database or KONTEXT_ settings: a command
    run with it starts on its embedded defaults."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL") and not k.startswith("KONTEXT_")
    }
    env["KONTEXT_KAFKA_SESSION_TIMEOUT_MS"] = "3000"
    return env


def run_cli(
    args: list[str], cwd: Path, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    """``kontext ARGS`` on its embedded defaults (and ``env``), in ``cwd``; its output
    captured."""
    return subprocess.run(
        [sys.executable, "-m", "kontext.cli", *args],
        cwd=cwd,
        env={**embedded_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def gone(process: psutil.Process) -> bool:
    """Whether ``process`` has exited (a zombie not yet reaped counts)."""
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def stack_env(broker: EmbeddedBroker, database: EmbeddedPostgres, prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        DATABASE_URL=database.url,
        KONTEXT_TOPIC_PREFIX=prefix,
        KONTEXT_TOPIC_PARTITIONS="2",
        KONTEXT_KAFKA_SESSION_TIMEOUT_MS="3000",
        KONTEXT_RECONCILE_INTERVAL_S="1",
        # Memory small enough to exercise summaries and recall in a short conversation.
        KONTEXT_CONTEXT_BUDGET_TOKENS="512",
        KONTEXT_SUMMARIZER="extractive",
        KONTEXT_SUMMARY_TRIGGER_TOKENS="200",
        KONTEXT_SUMMARY_ROLLUP_TOKENS="200",
        KONTEXT_SUMMARY_MAX_TOKENS="96",
        KONTEXT_WEBHOOK_SECRET=",".join(WEBHOOK_SECRETS),
        KONTEXT_WEBHOOK_ALLOW_HOSTS="127.0.0.1,localhost",
        KONTEXT_WEBHOOK_RETRY_SCHEDULE_S="0,0.2,0.2",
        KONTEXT_WEBHOOK_POLL_INTERVAL_S="0.1",
        KONTEXT_WEBHOOK_TIMEOUT_S="3",
        # Long enough that a revoked key is only refused in time through NOTIFY.
        KONTEXT_AUTH_CACHE_TTL_S="300",
    )
    return env


@dataclass
class Stack:
    """A running ``kontext up`` process and how to reach it."""

    process: subprocess.Popen[str]
    api_url: str
    settings: Settings
    output: list[str]
    api_key: str = ""
    """The dev key ``kontext up`` printed (tenant ``default``)."""
    operator_key: str = ""

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization`` with the dev key: pass to every HTTP client of the API."""
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def operator_headers(self) -> dict[str, str]:
        """``Authorization`` with an operator key of the session stack, e.g. for /metrics."""
        assert self.operator_key, "only the session stack has an operator key"
        return {"Authorization": f"Bearer {self.operator_key}"}

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_stack(args: list[str], env: dict[str, str], cwd: Path) -> Stack:
    """Start ``kontext`` with ``args`` and wait for its ready line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kontext.cli", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output: list[str] = []
    found: list[str] = []
    keys: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            key = DEV_KEY.search(line)
            if key:
                keys.append(key.group(1))
            match = READY.search(line)
            if match:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(START_TIMEOUT_S) or not found:
        process.kill()
        raise RuntimeError("kontext did not become ready:\n" + "".join(output[-60:]))
    settings = Settings(
        kafka_bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS"),
        database_url=env.get("DATABASE_URL"),
        topic_prefix=env.get("KONTEXT_TOPIC_PREFIX", "kontext"),
    )
    return Stack(
        process=process,
        api_url=found[0],
        settings=settings,
        output=output,
        api_key=keys[0] if keys else "",
    )


async def _operator_key(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return (await keys.create(conn, "default", operator=True)).key
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def stack(broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path) -> Iterator[Stack]:
    """One stack for the session, serving both engines."""
    env = stack_env(broker, database, prefix=f"t{uuid.uuid4().hex[:8]}")
    running = start_stack(
        ["up", "--engine", "tiny", "--engine", "smollm2", "--port", "0"], env, workdir
    )
    running.operator_key = asyncio.run(_operator_key(database.url))
    yield running
    code = running.stop()
    assert code == 0, "".join(running.output[-40:])


async def own_database(database: EmbeddedPostgres) -> str:
    """A new, migrated database on the session's server: a stack on it shares no rows
    (webhook deliveries, jobs) with the other stacks of the session. Its URL."""
    name = f"own_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database.url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    url = database.url.rsplit("/", 1)[0] + f"/{name}"
    await asyncio.to_thread(upgrade, url)
    return url


@pytest.fixture
async def own_pool(database: EmbeddedPostgres) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database of its own (``own_database``): what a test leaves there
    (running lines, statistics) is no other test's."""
    pool = await create_pool(Settings(database_url=await own_database(database)))
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def pool(database: EmbeddedPostgres) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(Settings(database_url=database.url))
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def client(stack: Stack) -> AsyncIterator[KontextClient]:
    async with KontextClient(
        stack.api_url, stack.settings.bootstrap, topics=stack.settings.topics, api_key=stack.api_key
    ) as client:
        yield client


async def wait_for(
    condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.05
) -> None:
    """Wait until ``condition()`` (sync or async) is true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def run_inference(
    broker: EmbeddedBroker,
    engine: Engine,
    items: Sequence[EnrichedRequest],
    policies: Callable[[Settings], PolicyChain] | None = None,
    timeout: float = 180,
) -> list[JobCompletion]:
    """Hand ``items`` to a real inference worker as one micro-batch, on fresh topics of
    the real broker; the completions it published, in the order it published them.
    ``policies`` builds the worker's chain from its settings (none by default)."""
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=f"inf{uuid.uuid4().hex[:8]}",
        topic_partitions=1,
    )
    topics = settings.topics
    await ensure_topics(settings, [topics.completions, topics.dead_letters])
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
    reader = AIOKafkaConsumer(
        topics.completions, bootstrap_servers=settings.bootstrap, auto_offset_reset="earliest"
    )
    await producer.start()
    await reader.start()
    try:
        records = [Record("enriched", 0, n, None, item.encode()) for n, item in enumerate(items)]
        chain = policies(settings) if policies is not None else None
        worker = InferenceWorker(settings, engine, producer, chain)
        await asyncio.wait_for(worker.handle(records), timeout)
        return [
            JobCompletion.decode((await asyncio.wait_for(reader.getone(), 30)).value) for _ in items
        ]
    finally:
        await reader.stop()
        await producer.stop()
