"""What every request handler shares: settings, the database pool, the producer,
and the long-poll waiters."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from fastapi import Request

from kontext.settings import Settings
from producers.api.waiters import JobWaiters


@dataclass
class ApiState:
    settings: Settings
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    waiters: JobWaiters


def state(request: Request) -> ApiState:
    api: ApiState = request.app.state.api
    return api
