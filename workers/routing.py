"""Model routing: fallback while a model's workers are unhealthy, behind a circuit breaker.

Every inference worker publishes a heartbeat per model (``HeartbeatPublisher``)
with its consumer lag. The enricher, where every request (new, redriven or
reconciled) picks its inference topic, asks the ``Router``: a model whose
workers sent no heartbeat for ``route_heartbeat_timeout_s``, or lag more than
``route_max_lag`` records, opens its breaker and its requests go to the first
healthy model of ``model_fallbacks``. After ``route_cooldown_s`` the breaker is
half-open: the next request checks the model again, and a healthy model closes
the breaker (its requests come back), an unhealthy one opens it again. The
result's ``model`` names the model that answered and ``context.routed_from``
the one asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from kontext.settings import Settings
from kontext.tasks import settle
from schemas.limits import WorkerHeartbeat
from workers.follower import TopicFollower

log = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """closed (route to the model) -> open (fall back) -> half-open after ``cooldown_s``
    (check again) -> closed when healthy, open again when not."""

    cooldown_s: float
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0

    def update(self, healthy: bool, now: float) -> BreakerState:
        if self.state is BreakerState.CLOSED and not healthy:
            self.state, self.opened_at = BreakerState.OPEN, now
        elif self.state is BreakerState.OPEN and now - self.opened_at >= self.cooldown_s:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            if healthy:
                self.state = BreakerState.CLOSED
            else:
                self.state, self.opened_at = BreakerState.OPEN, now
        return self.state


class HeartbeatFollower(TopicFollower[tuple[str, str], WorkerHeartbeat]):
    """The latest heartbeat of every inference worker, read from the heartbeats topic."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings, settings.topics.heartbeats, WorkerHeartbeat, lambda b: (b.model, b.worker_id)
        )
        self.started_at = time.time()

    def healthy(self, model: str, now: float) -> bool:
        """A fresh heartbeat from some worker of ``model``, and their lag within bound.
        Until one timeout after start, a model never heard of counts as healthy."""
        timeout = self.settings.route_heartbeat_timeout_s
        beats = [b for (m, _), b in self.latest.items() if m == model]
        alive = [b for b in beats if now - b.at <= timeout]
        if not alive:
            return not beats and now - self.started_at <= timeout
        bound = self.settings.route_max_lag
        if bound is None:
            return True
        return sum(b.lag or 0 for b in alive) <= bound


class Router:
    """Chooses the model that answers each request (see the module docstring)."""

    name = "router"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = HeartbeatFollower(settings)
        self.breakers: dict[str, CircuitBreaker] = {}
        self.stopping = asyncio.Event()
        self.started = False

    def breaker(self, model: str, now: float) -> BreakerState:
        breaker = self.breakers.get(model)
        if breaker is None:
            breaker = self.breakers[model] = CircuitBreaker(self.settings.route_cooldown_s)
        return breaker.update(self.health.healthy(model, now), now)

    def choose(self, model: str, now: float | None = None) -> str:
        """The model to send a request for ``model`` to."""
        fallbacks = self.settings.model_fallbacks.get(model)
        if not fallbacks:
            return model
        now = time.time() if now is None else now
        if self.breaker(model, now) is BreakerState.CLOSED:
            return model
        for fallback in fallbacks:
            if fallback in self.settings.engines and (
                self.breaker(fallback, now) is BreakerState.CLOSED
            ):
                return fallback
        return model  # nothing healthier to go to

    # The Service protocol: the router follows heartbeats while the enricher runs.
    async def run(self) -> None:
        self.started = True
        await self.health.run(self.stopping)

    def ready(self) -> bool:
        return self.started

    async def stop(self) -> None:
        self.stopping.set()


class HeartbeatPublisher:
    """Publishes one inference worker's heartbeat for its model every
    ``heartbeat_interval_s``, with how far its consumers are behind."""

    def __init__(
        self,
        settings: Settings,
        model: str,
        producer: AIOKafkaProducer,
        consumers: list[AIOKafkaConsumer],
    ) -> None:
        self.name = f"heartbeat-{model}"
        self.settings = settings
        self.model = model
        self.producer = producer
        self.consumers = consumers
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stopping = asyncio.Event()
        self.started = False

    async def lag(self) -> int | None:
        """Records not yet consumed on the assigned partitions (from the last fetch's
        high watermark); None before the first fetch."""
        total = 0
        for consumer in self.consumers:
            for tp in consumer.assignment():
                high = consumer.highwater(tp)
                if high is None:
                    return None
                try:
                    position = await asyncio.wait_for(consumer.position(tp), timeout=0.5)
                except Exception:  # not fetched yet, or the consumer is stopping
                    return None
                total += max(0, high - position)
        return total

    async def run(self) -> None:
        self.started = True
        while not self.stopping.is_set():
            beat = WorkerHeartbeat(
                model=self.model, worker_id=self.worker_id, at=time.time(), lag=await self.lag()
            )
            try:
                sent = await self.producer.send(
                    self.settings.topics.heartbeats, beat.encode(), key=self.model.encode()
                )
            except KafkaError as exc:
                log.warning("heartbeat for %s not sent: %s", self.model, exc)
            else:  # nothing waits for its delivery, so a failed one is logged
                settle([sent], log, f"heartbeat for {self.model}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.stopping.wait(), timeout=self.settings.heartbeat_interval_s
                )

    def ready(self) -> bool:
        return self.started

    async def stop(self) -> None:
        self.stopping.set()
