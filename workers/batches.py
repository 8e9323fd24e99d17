"""The batches service: keeps batch counts current and closes batches whose jobs are done.

Every ``backfill_sweep_interval_s`` (1 s) it recounts every open batch from its
jobs in one statement (so a line answered, failed, cancelled or expired is
counted once, whatever path it took), expires overdue batches, and moves a
batch with no job left to run to ``finalizing``, then ``completed``. A batch
that ended gets its output and error files (``workers/batch_files.py``) and one
delivery of its end event for its webhook and one per subscribed endpoint of its
tenant, which the webhooks service attempts.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from kontext.settings import Settings
from kontext.store import batches, deliveries
from schemas.events import utcnow
from workers import batch_files
from workers.periodic import every
from workers.services import Resources, Service, service

log = logging.getLogger(__name__)

SWEEP_LOCK = 0x6B_62_61_74_63_68  # "kbatch": the advisory lock a sweep holds


def end_event(row: batches.BatchRow) -> deliveries.BatchEvent:
    """``batch.completed`` (or ``.failed``, ``.cancelled``, ``.expired``); the data is the
    batch as ``GET /v1/batches/{id}`` shows it (its files included), without the bad-line
    list. ``url`` is the batch's own webhook, if any (the tenant's endpoints get the
    event too)."""
    event = f"batch.{row.status}"
    data = row.view().model_dump(mode="json", exclude={"errors"})
    return deliveries.BatchEvent(
        batch_id=row.id,
        type=event,
        url=row.webhook["url"] if row.webhook else None,
        secret=row.webhook.get("secret") if row.webhook else None,
        payload={"type": event, "timestamp": utcnow().isoformat(), "data": data},
    )


async def close(conn: asyncpg.Connection, delay: float) -> None:
    """Complete finalizing batches, write the output and error files of ended ones and
    queue their end events (``conn`` in a transaction)."""
    await batches.complete(conn)
    ended = [await batch_files.write(conn, row) for row in await batches.unnotified(conn)]
    if ended:
        await deliveries.create_for_batches(conn, [end_event(r) for r in ended], delay)
        await batches.mark_notified(conn, [r.id for r in ended])


class Sweeper:
    """The ``batches`` service: every ``backfill_sweep_interval_s``, expire overdue
    batches (their unstarted jobs fail, releasing the budget they held), recount open
    ones, close finished ones."""

    name = "batches"

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.interval_s = settings.backfill_sweep_interval_s
        self.first_delay_s = settings.webhook_retry_schedule_s[0]
        self.stopping = asyncio.Event()
        self.started = False

    async def sweep(self) -> None:
        """One transaction, so a batch is never seen ended without its files; one sweeper
        of the deployment at a time (another skips its turn)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK):
                return
            expired = await batches.expire(conn)
            await batches.refresh(conn, batch_ids=expired)
            await close(conn, self.first_delay_s)

    async def run(self) -> None:
        self.started = True
        await every(self.interval_s, self.sweep, self.stopping, "batch sweep")

    def ready(self) -> bool:
        return self.started

    async def stop(self) -> None:
        self.stopping.set()


@service("batches")
async def batches_service(shared: Resources) -> list[Service]:
    return [Sweeper(shared.settings, shared.pool)]
