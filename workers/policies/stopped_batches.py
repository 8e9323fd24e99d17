"""Lines of a stopped batch: a cancel or an expiry fails the lines still queued, and
this step fails those already enriched before the engine runs them.

A cancelled batch's lines can be past the enricher, waiting on the inference topic
behind a long backfill; without this step they would all still run. One Postgres
round trip per micro-batch that carries batch lines (none for the others). Lines the
engine is already running finish.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

import asyncpg

from kontext.store import batches
from schemas.events import EnrichedRequest, JobCompletion
from workers.policies.base import Policy


class StoppedBatches(Policy):
    """Fails, as ``batch_cancelled`` or ``batch_expired``, the lines of stopped batches."""

    name = "stopped_batches"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def before_engine(self, items: Sequence[EnrichedRequest]) -> dict[UUID, JobCompletion]:
        named = {i.request.batch_id for i in items if i.request.batch_id is not None}
        if not named:
            return {}
        stopped = await batches.stopped(self.pool, list(named))
        return {
            item.request.job_id: JobCompletion.failure(item.request, error, item.context)
            for item in items
            if item.request.batch_id is not None
            and (error := stopped.get(item.request.batch_id)) is not None
        }
