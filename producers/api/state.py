"""What every request handler shares: settings, the database pool, the producer,
and the long-poll waiters."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaProducer
from fastapi import Request

from kontext.settings import Settings
from kontext.store import ledger
from producers.api.waiters import JobWaiters
from workers.policies.chain import PolicyChain


@dataclass
class ApiState:
    settings: Settings
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    waiters: JobWaiters
    admitter: ledger.Admitter
    """Records new jobs in the ledger, many per statement under load."""
    chain: PolicyChain = field(default_factory=lambda: PolicyChain([]))
    """The policy chain's API hooks (built in workers/policies/compose.py)."""


async def state(request: Request) -> ApiState:
    """The app's shared state (async: FastAPI runs a sync dependency in a thread)."""
    api: ApiState = request.app.state.api
    return api
