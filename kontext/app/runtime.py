"""Running services: the embedded dev runtime, and the API and workers in one event loop.

``kontext up`` runs every service here; ``kontext worker NAME`` runs one, so
production scales each out on its own against external Kafka and Postgres.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from kontext import metrics, migrate, tracing
from kontext.app import health
from kontext.connections import (
    create_consumer,
    create_pool,
    create_producer,
    ensure_topics,
    reach_postgres,
)
from kontext.settings import Settings
from producers import submissions
from producers.api.server import ApiService
from schemas.topics import Group
from workers import catalog
from workers.embeddings import Embedder, load_embedder
from workers.engines import load_engine
from workers.engines.base import Engine
from workers.engines.device import device, dtype
from workers.pacing import Pacer, background_reserve
from workers.services import REGISTRY, Service

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICES = ("api", submissions.NAME, *catalog.WORKERS)
"""Every service, in the order a process starts and stops them (intakes first)."""
READY_TIMEOUT_S = 60.0


@dataclass
class Runtime:
    """The services of one process, sharing one pool and one producer."""

    settings: Settings
    services: list[Service] = field(default_factory=list)
    _pool: asyncpg.Pool | None = None
    _producer: AIOKafkaProducer | None = None
    engines: list[Engine] = field(default_factory=list)
    _embedder: Embedder | None = None
    pacer: Pacer = field(init=False)

    def __post_init__(self) -> None:
        # One per process: its stages share its cores.
        window_s = self.settings.pacing_window_ms / 1000
        self.pacer = Pacer(self.settings.background_share, window_s)

    @property
    def api_port(self) -> int | None:
        return next((s.port for s in self.services if isinstance(s, ApiService)), None)

    @property
    def pool(self) -> asyncpg.Pool:
        """The process's Postgres pool (none in a process running only the API)."""
        if self._pool is None:
            raise RuntimeError("this process has no shared pool")
        return self._pool

    @property
    def producer(self) -> AIOKafkaProducer:
        """The process's Kafka producer (none in a process running only the API)."""
        if self._producer is None:
            raise RuntimeError("this process has no shared producer")
        return self._producer

    async def start(self, names: Sequence[str]) -> None:
        """Build ``names``' services; if one cannot be built (a port taken, Postgres out
        of reach), what was opened for them is closed before the error goes on."""
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown services {unknown}; known: {', '.join(SERVICES)}")
        try:
            await self._build(names)
        except BaseException:
            await self._close()
            raise

    async def _build(self, names: Sequence[str]) -> None:
        settings = self.settings
        tracing.configure(settings, names)
        await ensure_topics(settings, settings.topics.all(settings.engines))
        if (port := metrics.serve(settings.metrics_port, settings.metrics_host)) is not None:
            log.info("Prometheus metrics on http://%s:%d/metrics", settings.metrics_host, port)
        if any(REGISTRY[name].shared for name in names):
            self._pool = await create_pool(settings)
            self._producer = create_producer(settings)
            await self._producer.start()
        for name in names:
            self.services.extend(await REGISTRY[name].build(self))

    async def embedder(self) -> Embedder:
        """One embedding model per process, shared by the enricher and the recorder."""
        if self._embedder is None:
            on = device(self.settings)
            chunk = background_reserve(self.settings.batch_max_size, self.settings.background_share)
            self._embedder = await asyncio.to_thread(
                load_embedder,
                self.settings.embedder,
                on,
                self.pacer,
                chunk,
                dtype(self.settings, on),
            )
        return self._embedder

    async def engine(self, model: str) -> Engine:
        loaded = await load_engine(model, self.settings)
        self.engines.append(loaded)
        return loaded

    def consumer(self, group: Group) -> AIOKafkaConsumer:
        return create_consumer(self.settings, *group.topics, group_id=group.id)

    async def run(self, stop: asyncio.Event, on_ready: Callable[[Runtime], None]) -> None:
        """Run until ``stop`` is set or a service fails, then shut down in order."""
        tasks = {asyncio.create_task(s.run(), name=s.name): s for s in self.services}
        try:
            await self._wait_ready(tasks, stop)
            if not stop.is_set():
                on_ready(self)
                stopper = asyncio.create_task(stop.wait())
                beating = asyncio.Event()
                beat = self._beat(beating)
                done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                beating.set()
                if beat is not None:
                    await beat
                for task in done - {stopper}:
                    if task.exception() is not None:
                        raise RuntimeError(
                            f"service {task.get_name()} failed"
                        ) from task.exception()
        finally:
            await self._shutdown(tasks)

    def _beat(self, stop: asyncio.Event) -> asyncio.Task[None] | None:
        """The heartbeat of this process's liveness, if KONTEXT_HEALTH_FILE is set."""
        path = self.settings.health_file
        if path is None:
            return None
        return asyncio.create_task(
            health.beat(path, lambda: all(s.ready() for s in self.services), stop)
        )

    async def _wait_ready(
        self, tasks: dict[asyncio.Task[None], Service], stop: asyncio.Event
    ) -> None:
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        while not all(s.ready() for s in self.services):
            for task in tasks:
                if task.done():
                    task.result()
                    raise RuntimeError(f"service {task.get_name()} exited during start-up")
            if stop.is_set():
                return
            if asyncio.get_running_loop().time() > deadline:
                waiting = [s.name for s in self.services if not s.ready()]
                raise TimeoutError(f"services not ready after {READY_TIMEOUT_S}s: {waiting}")
            await asyncio.sleep(0.05)

    async def _shutdown(self, tasks: dict[asyncio.Task[None], Service]) -> None:
        """Stop intake first (API), then each worker after its in-flight batch."""
        for task, service in tasks.items():
            try:
                await service.stop()
                await asyncio.wait_for(asyncio.shield(task), timeout=30)
            except TimeoutError:
                log.warning("%s did not stop in 30s; cancelled", service.name)
                task.cancel()
            except Exception:
                log.exception("%s failed while stopping", service.name)
        await self._close()

    async def _close(self) -> None:
        """Close what the services shared: the producer, the pool, the engines."""
        if self._producer is not None:
            await self._producer.stop()
        if self._pool is not None:
            await self._pool.close()
        for engine in self.engines:
            await engine.close()
        tracing.shutdown()


async def run_while(
    settings: Settings,
    work: Callable[[Runtime, str], Awaitable[T]],
    stop: asyncio.Event,
    services: Sequence[str] = SERVICES,
) -> T:
    """Migrate, start the services (default: every one), run ``work(runtime, api_url)``
    once all are ready, then shut down. Raises RuntimeError if the runtime stopped
    before the work finished."""
    await prepare(settings)
    runtime = Runtime(settings)
    await runtime.start(services)
    started = asyncio.Event()

    async def go() -> T:
        await started.wait()
        try:
            return await work(runtime, f"http://{settings.api_host}:{runtime.api_port}")
        finally:
            stop.set()

    task = asyncio.create_task(go())
    await runtime.run(stop, lambda _: started.set())
    if not task.done():
        task.cancel()
        raise RuntimeError("Kontext stopped before the work finished")
    return task.result()


async def prepare(settings: Settings) -> None:
    """Apply migrations (blocking work, off the loop), once Postgres answers
    (``Unreachable`` otherwise)."""
    await reach_postgres(settings)
    await asyncio.to_thread(migrate.upgrade, settings.dsn)
