"""What every request handler shares: settings, the database pool, the producer."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from fastapi import Request

from kontext.settings import Settings


@dataclass
class ApiState:
    settings: Settings
    pool: asyncpg.Pool
    producer: AIOKafkaProducer


def state(request: Request) -> ApiState:
    api: ApiState = request.app.state.api
    return api
