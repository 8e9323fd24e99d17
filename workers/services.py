"""Services: what a process runs, and the registry that names every one.

A worker module declares its service beside its handler, as a faust agent names
its topic: ``@service(name, groups=...)`` on a function that builds it from what
a process shares (``Resources``). ``groups`` says which consumer groups the
service reads, and which topics each one reads: the runtime creates its
consumers from them, and the dashboard lists the same groups. The composition
root (``kontext.app``) builds the services a process is asked for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from kontext.settings import Settings
from schemas.topics import Group
from workers.consumer import BatchConsumer
from workers.embeddings import Embedder
from workers.engines.base import Engine
from workers.pacing import Pacer


class Service(Protocol):
    """A long-running part of a process, started and stopped by the runtime."""

    name: str

    async def run(self) -> None: ...

    def ready(self) -> bool: ...

    async def stop(self) -> None: ...


class Resources(Protocol):
    """What one process shares among its services (the runtime provides it)."""

    settings: Settings
    pacer: Pacer

    @property
    def pool(self) -> asyncpg.Pool:
        """The process's Postgres pool."""
        ...

    @property
    def producer(self) -> AIOKafkaProducer:
        """The process's Kafka producer."""
        ...

    async def embedder(self) -> Embedder:
        """The process's one embedding model."""
        ...

    async def engine(self, model: str) -> Engine:
        """A loaded engine for ``model``, closed with the process."""
        ...

    def consumer(self, group: Group) -> AIOKafkaConsumer:
        """A consumer in ``group``, subscribed to its topics."""
        ...


Build = Callable[[Resources], Awaitable[Sequence[Service]]]
Groups = Callable[[Settings], list[Group]]


def no_groups(settings: Settings) -> list[Group]:
    return []


@dataclass(frozen=True)
class ServiceSpec:
    """A service by name: how to build it and the groups it reads."""

    name: str
    build: Build
    groups: Groups = no_groups
    shared: bool = True
    """Needs the process's pool and producer (the API opens its own)."""


REGISTRY: dict[str, ServiceSpec] = {}
"""Every service by name, in the order their modules registered them."""


def service(
    name: str, groups: Groups = no_groups, *, shared: bool = True
) -> Callable[[Build], Build]:
    """Register the decorated builder as the service ``name``."""

    def register(build: Build) -> Build:
        if name in REGISTRY:
            raise ValueError(f"service {name!r} is registered twice")
        REGISTRY[name] = ServiceSpec(name, build, groups, shared)
        return build

    return register


class ConsumerService:
    """A BatchConsumer as a service."""

    def __init__(self, consumer: BatchConsumer) -> None:
        self.name = consumer.handler.name
        self.consumer = consumer

    async def run(self) -> None:
        await self.consumer.run()

    def ready(self) -> bool:
        return self.consumer.ready()

    async def stop(self) -> None:
        self.consumer.stop()
