"""The reconciler: Postgres is the ledger, so no job is lost to a lost message.

Every few seconds it finds jobs left queued or running past their lease (their
message was lost with a broker, or their worker died mid-batch) and publishes
their request again. Every consumer is idempotent by job id, so a job that was
only slow is still answered once. Turns waiting behind an earlier turn of their
conversation are left alone: the recorder sends them on. Work that is only slow
under load is not multiplied by re-drives: a job's lease doubles with every
attempt (up to 8 times), and a job past its lease is stuck only when its lane
(its model's interactive or background jobs) finished nothing within the lease,
or, for an interactive job, when one that came after it has finished. A backlog
after a worker's restart is worked through, not re-driven job by job. A
background job (a backfill line, a summary) waits behind the rest of its lane,
possibly for hours: only a stalled lane makes it stuck.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from kontext.settings import Settings
from kontext.store import ledger, reviews
from schemas.events import ErrorInfo, JobRequest
from workers import completions
from workers.intake import publish
from workers.periodic import every
from workers.services import Resources, Service, service

log = logging.getLogger(__name__)

UNREADABLE = ErrorInfo(
    code="unreadable_request", message="the job's stored request cannot be read; it was not run"
)

REDRIVE_LIMIT = 500

STUCK_JOBS = """
WITH lanes AS (
    -- Each lane (model, and background or not) that finished a job within the lease,
    -- with the newest job it finished: by when it was accepted, and when claimed.
    SELECT d.model, d.request->>'priority' = 'background' AS background,
        max(d.created_at) AS newest_accepted, max(d.claimed_at) AS newest_claimed
    FROM jobs d
    WHERE d.status IN ('succeeded', 'failed')
        AND d.updated_at > now() - $1::interval
        AND d.model = ANY($3::text[])
    GROUP BY 1, 2
)
UPDATE jobs SET updated_at = now()
WHERE id IN (
    SELECT j.id FROM jobs j
    LEFT JOIN lanes l ON l.model = j.model
        AND l.background = (j.request->>'priority' = 'background')
    WHERE j.status IN ('queued', 'running')
        -- Only what this deployment runs: another one on the same database (a
        -- blue/green twin, another model family) re-drives its own jobs.
        AND j.model = ANY($3::text[])
        -- The lease doubles with each admission (up to 8x): a job only slow under load
        -- is not re-driven again and again, each re-drive adding to the load.
        AND j.updated_at < now() - $1::interval * least(2 ^ greatest(j.attempts - 1, 0), 8)
        AND NOT EXISTS (
            SELECT 1 FROM conversations c
            WHERE c.id = j.conversation_id AND j.id = ANY(c.waiting))
        -- Stuck when its lane finished nothing within the lease (stalled), or, for an
        -- interactive job, when one that came after it (accepted after it was queued,
        -- claimed after it was) has finished: a job behind a backlog that its lane is
        -- working through is waiting, not lost. A background job queues behind its
        -- lane, possibly for hours: only a stalled lane makes it stuck.
        AND (
            l.model IS NULL
            OR (
                j.request->>'priority' IS DISTINCT FROM 'background'
                AND CASE j.status
                    WHEN 'queued' THEN l.newest_accepted > j.updated_at
                    ELSE l.newest_claimed > j.updated_at
                END))
    ORDER BY j.updated_at
    LIMIT $2
    FOR UPDATE OF j SKIP LOCKED
)
RETURNING id, request
"""


class Reconciler:
    name = "reconciler"

    def __init__(self, settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.stopping = asyncio.Event()

    async def sweep(self, lease_s: float | None = None) -> int:
        """Re-publish every job stuck past its lease (``lease_s``, default the
        deployment's; 0: every open job not waiting behind its conversation's turn in
        flight), at most ``REDRIVE_LIMIT``; returns how many."""
        lease = timedelta(seconds=self.settings.job_lease_s if lease_s is None else lease_s)
        served = [*self.settings.engines, *self.settings.model_aliases]
        rows = await self.pool.fetch(STUCK_JOBS, lease, REDRIVE_LIMIT, served)
        stuck: list[JobRequest] = []
        for row in rows:
            try:
                stuck.append(JobRequest.model_validate(row["request"]))
            except ValidationError:
                # Nothing can run it: fail it rather than re-drive it for ever.
                log.error("job %s: its stored request is unreadable; failing it", row["id"])
                await ledger.fail(self.pool, row["id"], UNREADABLE)
        if stuck:
            # The enricher decides a job's limits once: a re-drive is not counted twice.
            await asyncio.gather(*await publish(self.settings, self.producer, stuck))
            log.warning("re-drove %d job(s) stuck past their %ss lease", len(stuck), lease.seconds)
        # Reviewed results whose decision was published but never recorded (message lost).
        decided = await reviews.decided_unrecorded(self.pool, lease, REDRIVE_LIMIT)
        if decided:
            await asyncio.gather(*await completions.publish(self.settings, self.producer, decided))
        return len(stuck) + len(decided)

    async def redrive_all(self) -> None:
        """Publish every open job again (a new broker has none of their messages)."""
        total = 0
        while (count := await self.sweep(lease_s=0)) > 0:
            total += count
            if count < REDRIVE_LIMIT:
                break
        log.info("re-drove the %d open job(s) of the ledger on a new broker", total)

    async def run(self) -> None:
        if self.settings.redrive_at_start:
            try:
                await self.redrive_all()
            except (OSError, asyncpg.PostgresError, KafkaError):
                log.exception("could not re-drive the open jobs at start; their leases will")
        # A failing sweep (the database or broker down, or a bug) never stops the others.
        await every(
            self.settings.reconcile_interval_s,
            self.sweep,
            self.stopping,
            "reconciler sweep",
            expected=(OSError, asyncpg.PostgresError, KafkaError),
        )

    def ready(self) -> bool:
        return True

    async def stop(self) -> None:
        self.stopping.set()


@service("reconciler")
async def reconciler_service(shared: Resources) -> list[Service]:
    return [Reconciler(shared.settings, shared.pool, shared.producer)]
