"""Every worker service, registered by importing its module, in pipeline order."""

from __future__ import annotations

from kontext.settings import Settings
from schemas.topics import Group
from workers import (
    batches,
    enricher,
    inference,
    reconciler,
    recorder,
    webhooks,
)
from workers.services import REGISTRY, ServiceSpec

WORKERS = (
    "enricher",
    "inference",
    "recorder",
    "webhooks",
    "batches",
    "reconciler",
)
"""The order a process starts them in, and stops them in (upstream first)."""

MODULES = (batches, enricher, inference, reconciler, recorder, webhooks)


def spec(name: str) -> ServiceSpec:
    return REGISTRY[name]


def groups(settings: Settings) -> list[Group]:
    """Every consumer group the worker services of ``settings`` read."""
    return [g for name in WORKERS for g in REGISTRY[name].groups(settings)]
