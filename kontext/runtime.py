"""Running services: the embedded dev runtime, and the API and workers in one event loop.

``kontext up`` runs every service here; ``kontext worker NAME`` runs one, so
production scales each out on its own against external Kafka and Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypedDict, TypeVar

import asyncpg
import uvicorn
from aiokafka import AIOKafkaProducer

from kontext import health, metrics, migrate
from kontext.connections import create_consumer, create_pool, create_producer, ensure_topics
from kontext.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.settings import Settings
from producers.api.app import create_app
from workers.admission import Settler, admission_processor
from workers.batches import BatchService
from workers.consumer import BatchConsumer
from workers.embeddings import Embedder
from workers.engines import concurrent_batches, load_engine, load_tokenizer
from workers.engines.base import Engine
from workers.engines.device import device
from workers.enricher import Enricher, ServedModel
from workers.inference import InferenceWorker
from workers.memory import MemoryWorker
from workers.pacing import Pacer, background_reserve
from workers.policies.compose import ChainParts, build_chain
from workers.reconciler import Reconciler
from workers.recorder import Recorder
from workers.routing import HeartbeatPublisher, Router
from workers.streams import StreamProcessor
from workers.usage import UsageRecorder
from workers.webhooks import WebhookService

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICES = (
    "api",
    "admission",
    "enricher",
    "inference",
    "recorder",
    "memory",
    "webhooks",
    "batches",
    "usage",
    "reconciler",
)
READY_TIMEOUT_S = 60.0


class Service(Protocol):
    name: str

    async def run(self) -> None: ...

    def ready(self) -> bool: ...

    async def stop(self) -> None: ...


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiService:
    name = "api"

    def __init__(self, settings: Settings) -> None:
        config = uvicorn.Config(
            create_app(settings), log_level="warning", lifespan="on", access_log=False
        )
        self.server = _Server(config)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((settings.api_host, settings.api_port))
        self.port: int = self.socket.getsockname()[1]

    async def run(self) -> None:
        await self.server.serve(sockets=[self.socket])

    def ready(self) -> bool:
        return self.server.started

    async def stop(self) -> None:
        self.server.should_exit = True


class ConsumerService:
    def __init__(self, consumer: BatchConsumer) -> None:
        self.name = consumer.handler.name
        self.consumer = consumer

    async def run(self) -> None:
        await self.consumer.run()

    def ready(self) -> bool:
        return self.consumer.ready()

    async def stop(self) -> None:
        self.consumer.stop()


class StreamService:
    def __init__(self, processor: StreamProcessor) -> None:
        self.name = processor.name
        self.processor = processor

    async def run(self) -> None:
        await self.processor.run()

    def ready(self) -> bool:
        return self.processor.assigned()

    async def stop(self) -> None:
        await self.processor.stop()


@contextlib.contextmanager
def embedded(settings: Settings) -> Iterator[Settings]:
    """Start the embedded broker and/or database where the settings name none."""
    broker: EmbeddedBroker | None = None
    database: EmbeddedPostgres | None = None
    try:
        updates: dict[str, str] = {}
        if not settings.kafka_bootstrap_servers:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            broker = EmbeddedBroker(log_path=settings.data_dir / "broker.log").start()
            updates["kafka_bootstrap_servers"] = broker.bootstrap_servers
            log.info("embedded Kafka broker (Tansu) on %s", broker.bootstrap_servers)
        if not settings.database_url:
            database = EmbeddedPostgres(settings.data_dir / "postgres").start()
            updates["database_url"] = database.url
            log.info("embedded PostgreSQL on 127.0.0.1:%d", database.port)
        yield settings.model_copy(update=updates)
    finally:
        if database is not None:
            database.stop()
        if broker is not None:
            broker.stop()


class BatchLimits(TypedDict):
    """A BatchConsumer's micro-batch bounds."""

    max_size: int
    max_wait_ms: int


@dataclass
class Runtime:
    """The services of one process, sharing one pool and one producer."""

    settings: Settings
    services: list[Service] = field(default_factory=list)
    pool: asyncpg.Pool | None = None
    producer: AIOKafkaProducer | None = None
    engines: list[Engine] = field(default_factory=list)
    embedder: Embedder | None = None
    pacer: Pacer = field(init=False)

    def __post_init__(self) -> None:
        # One per process: its stages share its cores.
        window_s = self.settings.pacing_window_ms / 1000
        self.pacer = Pacer(self.settings.background_share, window_s)

    @property
    def api_port(self) -> int | None:
        return next((s.port for s in self.services if isinstance(s, ApiService)), None)

    async def start(self, names: Sequence[str]) -> None:
        settings = self.settings
        unknown = [n for n in names if n not in SERVICES]
        if unknown:
            raise ValueError(f"unknown services {unknown}; known: {', '.join(SERVICES)}")
        await ensure_topics(settings, settings.topics.all(settings.engines))
        if (port := metrics.serve(settings.metrics_port, settings.metrics_host)) is not None:
            log.info("Prometheus metrics on http://%s:%d/metrics", settings.metrics_host, port)
        if set(names) - {"api"}:
            self.pool = await create_pool(settings)
            self.producer = create_producer(settings)
            await self.producer.start()
        for name in names:
            self.services.extend(await self._build(name))

    async def _embedder(self) -> Embedder:
        """One embedding model per process, shared by the enricher and the memory worker."""
        if self.embedder is None:
            on = device(self.settings)
            chunk = background_reserve(self.settings.batch_max_size, self.settings.background_share)
            self.embedder = await asyncio.to_thread(Embedder, on, self.pacer, chunk)
        return self.embedder

    async def _build(self, name: str) -> list[Service]:
        settings, pool, producer = self.settings, self.pool, self.producer
        if name == "api":
            return [ApiService(settings)]
        assert pool is not None and producer is not None
        batch = BatchLimits(
            max_size=settings.batch_max_size, max_wait_ms=settings.batch_max_wait_ms
        )
        if name == "enricher":
            models = {model: ServedModel.load(model, settings) for model in settings.engines}
            router = Router(settings)
            handler = Enricher(
                settings, pool, producer, models, await self._embedder(), router=router
            )
            # One stream processor per lane: a backfill waiting to be enriched never
            # holds up an interactive turn.
            return [
                router,
                StreamService(StreamProcessor(settings, settings.topics.requests, handler)),
                StreamService(
                    StreamProcessor(
                        settings,
                        settings.topics.requests_lane("background"),
                        handler,
                        name=f"{handler.name}-background",
                    )
                ),
            ]
        if name == "admission":
            if not settings.policy_limits:
                return []
            settler = create_consumer(
                settings, settings.topics.completions, group_id=f"{settings.topic_prefix}-settler"
            )
            return [
                StreamService(admission_processor(settings, pool, producer)),
                ConsumerService(BatchConsumer(settler, Settler(settings, producer), **batch)),
            ]
        if name == "recorder":
            consumer = create_consumer(
                settings, settings.topics.completions, group_id=f"{settings.topic_prefix}-recorder"
            )
            return [
                ConsumerService(
                    BatchConsumer(consumer, Recorder(settings, pool, producer), **batch)
                )
            ]
        if name == "memory":
            consumer = create_consumer(
                settings, settings.topics.replies, group_id=f"{settings.topic_prefix}-memory"
            )
            model = settings.summary_model or settings.engines[0]
            worker = MemoryWorker(
                settings, pool, producer, await self._embedder(), load_tokenizer(model, settings)
            )
            return [ConsumerService(BatchConsumer(consumer, worker, **batch))]
        if name == "webhooks":
            consumer = create_consumer(
                settings, settings.topics.replies, group_id=f"{settings.topic_prefix}-webhooks"
            )
            return [WebhookService(settings, pool, producer, consumer)]
        if name == "usage":
            consumer = create_consumer(
                settings, settings.topics.replies, group_id=f"{settings.topic_prefix}-usage"
            )
            return [
                ConsumerService(
                    BatchConsumer(
                        consumer,
                        UsageRecorder(settings, pool, producer),
                        max_size=settings.usage_batch_max_size,
                        max_wait_ms=settings.usage_batch_max_wait_ms,
                    )
                )
            ]
        if name == "reconciler":
            return [Reconciler(settings, pool, producer)]
        if name == "batches":
            consumer = create_consumer(
                settings, settings.topics.replies, group_id=f"{settings.topic_prefix}-batches"
            )
            return [BatchService(settings, pool, producer, consumer)]
        services: list[Service] = []
        for model in settings.inference_engines or settings.engines:
            engine = await load_engine(model, settings)
            self.engines.append(engine)
            group = f"{settings.topic_prefix}-inference-{model}"
            interactive = create_consumer(
                settings, settings.topics.inference(model), group_id=group
            )
            background = create_consumer(
                settings,
                settings.topics.inference(model, "background"),
                group_id=f"{group}-background",
            )
            inference = InferenceWorker(
                settings, engine, producer, build_chain(settings, ChainParts(pool=pool))
            )
            in_flight = settings.inference_max_in_flight or concurrent_batches(model)
            services.append(
                ConsumerService(
                    BatchConsumer(
                        interactive,
                        inference,
                        background=background,
                        background_share=settings.background_share,
                        max_in_flight=in_flight,
                        pacer=self.pacer,
                        **batch,
                    )
                )
            )
            services.append(HeartbeatPublisher(settings, model, producer, [interactive]))
        return services

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
        if self.producer is not None:
            await self.producer.stop()
        if self.pool is not None:
            await self.pool.close()
        for engine in self.engines:
            await engine.close()


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
    """Apply migrations (blocking work, off the loop)."""
    await asyncio.to_thread(migrate.upgrade, settings.dsn)
