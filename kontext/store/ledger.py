"""The jobs ledger in Postgres: SQL for admitting, claiming and finalising jobs.

Raw asyncpg, one statement per micro-batch on the hot paths. Postgres is the
system of record; every write here is idempotent by job id, so at-least-once
delivery from Kafka never answers a job twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from kontext.store.deliveries import CHANNEL as DELIVERIES_CHANNEL
from kontext.store.deliveries import SUBSCRIBED
from schemas.api import JobStatus, JobTimeline
from schemas.events import (
    ChatCompletion,
    ErrorInfo,
    JobCompletion,
    JobKind,
    JobRequest,
    ReplyRoute,
)
from schemas.usage import NIL_KEY


@dataclass(frozen=True)
class JobRow:
    id: UUID
    conversation_id: str
    model: str
    status: JobStatus
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: datetime
    completed_at: datetime | None
    request: dict[str, Any] | None = None
    """Its request, only when ``admit`` found the job by its idempotency key."""


_JOB_COLUMNS = "id, conversation_id, model, status, result, error, created_at, completed_at"


def _row(record: asyncpg.Record) -> JobRow:
    return JobRow(**dict(record))


class ConversationNotOwned(Exception):
    """The conversation id belongs to another tenant: this tenant may not extend it."""


ADMIT_TRIES = 3


async def admit(
    pool: asyncpg.Pool,
    request: JobRequest,
    idempotency_key: str | None,
    webhook_secret: str | None = None,
) -> tuple[JobRow, bool]:
    """Record a new queued job of ``request.tenant_id``; with a known idempotency key
    (of that tenant), return that job instead, with its request. ``webhook_secret``
    (the job's own signing secret) is kept in its own column, never in the request.

    A new conversation id becomes the tenant's conversation; one that another tenant
    owns raises ConversationNotOwned (nothing is stored). Returns the job and
    whether it was created now.
    """
    async with pool.acquire() as conn:
        for _ in range(ADMIT_TRIES):
            created = await conn.fetchrow(
                f"""
                WITH conversation AS (
                    INSERT INTO conversations (id, user_id, tenant_id) VALUES ($2, $7, $8)
                    ON CONFLICT (id) DO NOTHING
                    RETURNING tenant_id
                ), owner AS (
                    SELECT tenant_id FROM conversation
                    UNION ALL
                    SELECT tenant_id FROM conversations WHERE id = $2
                )
                INSERT INTO jobs (id, conversation_id, model, kind, status, request,
                    idempotency_key, tenant_id, key_id, webhook_secret)
                SELECT $1::uuid, $2::text, $3::text, $6::text, 'queued', $4::jsonb, $5::text,
                    $8::text, $9::uuid, $10::text
                WHERE EXISTS (SELECT 1 FROM owner WHERE tenant_id = $8)
                ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
                RETURNING {_JOB_COLUMNS}
                """,
                request.job_id,
                request.conversation_id,
                request.model,
                request.model_dump(mode="json"),
                idempotency_key,
                request.kind,
                request.user,
                request.tenant_id,
                request.key_id,
                webhook_secret,
            )
            if created is not None:
                return _row(created), True
            if idempotency_key is not None:
                # A statement after the insert sees the committed winner of the key.
                existing = await conn.fetchrow(
                    f"SELECT {_JOB_COLUMNS}, request FROM jobs WHERE tenant_id = $1 "
                    "AND idempotency_key = $2",
                    request.tenant_id,
                    idempotency_key,
                )
                if existing is not None:
                    return _row(existing), False
            owner = await conn.fetchval(
                "SELECT tenant_id FROM conversations WHERE id = $1", request.conversation_id
            )
            if owner is not None and owner != request.tenant_id:
                raise ConversationNotOwned(request.conversation_id)
            # Else the conversation was created or deleted concurrently: try again.
    raise RuntimeError(f"could not admit job {request.job_id}: its conversation kept changing")


ADMIT_MANY = f"""
WITH input AS (
    -- Requests come as JSON text (serialised once, by the model), cast here.
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]::jsonb[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::uuid[], $10::text[])
        WITH ORDINALITY
        AS i(id, conversation_id, model, request, idempotency_key, kind, user_id, tenant_id,
             key_id, webhook_secret, ord)
), conversation AS (
    INSERT INTO conversations (id, user_id, tenant_id)
    SELECT DISTINCT ON (conversation_id) conversation_id, user_id, tenant_id
    FROM input ORDER BY conversation_id, ord
    ON CONFLICT (id) DO NOTHING
    RETURNING id, tenant_id
), owner AS (
    SELECT id, tenant_id FROM conversation
    UNION ALL
    SELECT id, tenant_id FROM conversations
    WHERE id IN (SELECT conversation_id FROM input)
)
INSERT INTO jobs (id, conversation_id, model, kind, status, request, idempotency_key,
    tenant_id, key_id, webhook_secret)
SELECT i.id, i.conversation_id, i.model, i.kind, 'queued', i.request, i.idempotency_key,
    i.tenant_id, i.key_id, i.webhook_secret
FROM input i
WHERE EXISTS (SELECT 1 FROM owner o WHERE o.id = i.conversation_id AND o.tenant_id = i.tenant_id)
ORDER BY i.ord
ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
RETURNING {_JOB_COLUMNS}
"""


@dataclass(frozen=True)
class Admission:
    """A job to record: its request, its idempotency key and its own webhook secret."""

    request: JobRequest
    idempotency_key: str | None = None
    webhook_secret: str | None = None


async def admit_many(
    pool: asyncpg.Pool, admissions: Sequence[Admission]
) -> list[tuple[JobRow, bool] | ConversationNotOwned]:
    """``admit`` for many jobs, in one statement when each is simply new (a new job of
    a new conversation or of one its tenant owns); the others (an idempotency key
    seen before, a conversation of another tenant) go through ``admit`` one by one.
    Each result, in order, is the job and whether it was created now, or the
    exception ``admit`` raised for it."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            ADMIT_MANY,
            [a.request.job_id for a in admissions],
            [a.request.conversation_id for a in admissions],
            [a.request.model for a in admissions],
            [a.request.model_dump_json() for a in admissions],
            [a.idempotency_key for a in admissions],
            [a.request.kind for a in admissions],
            [a.request.user for a in admissions],
            [a.request.tenant_id for a in admissions],
            [a.request.key_id for a in admissions],
            [a.webhook_secret for a in admissions],
        )
    created = {row["id"]: _row(row) for row in rows}
    results: list[tuple[JobRow, bool] | ConversationNotOwned] = []
    for admission in admissions:
        row = created.get(admission.request.job_id)
        if row is not None:
            results.append((row, True))
            continue
        try:
            results.append(
                await admit(
                    pool, admission.request, admission.idempotency_key, admission.webhook_secret
                )
            )
        except ConversationNotOwned as exc:
            results.append(exc)
    return results


class Admitter:
    """Group commit of new jobs: every ``admit`` waiting while a statement runs goes
    into the next one (up to ``max_batch``), so a burst of submissions costs a few
    statements, not one each; a lone one goes at once."""

    def __init__(self, pool: asyncpg.Pool, max_batch: int = 500) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self._queue: list[tuple[Admission, asyncio.Future[tuple[JobRow, bool]]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def admit(
        self, request: JobRequest, idempotency_key: str | None, webhook_secret: str | None
    ) -> tuple[JobRow, bool]:
        """As ``admit``, batched with the other jobs being admitted."""
        done: asyncio.Future[tuple[JobRow, bool]] = asyncio.get_running_loop().create_future()
        self._queue.append((Admission(request, idempotency_key, webhook_secret), done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await done

    async def _write(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            waiting = [(a, f) for a, f in batch if not f.done()]
            try:
                results = await admit_many(self.pool, [a for a, _ in waiting])
            except Exception as exc:  # the statement failed: each job's submitter hears it
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(waiting, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, ConversationNotOwned):
                    future.set_exception(result)
                else:
                    future.set_result(result)


async def get(pool: asyncpg.Pool, job_id: UUID, tenant_id: str | None = None) -> JobRow | None:
    """The job, or None; with ``tenant_id``, only a job of that tenant."""
    row = await pool.fetchrow(
        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)",
        job_id,
        tenant_id,
    )
    return _row(row) if row is not None else None


async def timeline(pool: asyncpg.Pool, job_id: UUID) -> JobTimeline | None:
    """When the job reached each stage: what the statements that wrote its row stamped,
    and its first successful webhook delivery (read on request, never on the hot path)."""
    row = await pool.fetchrow(
        """
        SELECT j.created_at AS accepted, j.claimed_at AS admitted, j.enriched_at AS enriched,
            j.batched_at AS batched, j.generated_at AS generated, j.completed_at AS recorded,
            j.replied_at AS replied,
            (SELECT min(d.delivered_at) FROM webhook_deliveries d
             WHERE d.job_id = j.id) AS delivered
        FROM jobs j WHERE j.id = $1
        """,
        job_id,
    )
    return JobTimeline(**dict(row)) if row is not None else None


async def ended(pool: asyncpg.Pool, job_ids: Sequence[UUID]) -> set[UUID]:
    """Those of ``job_ids`` already final (succeeded or failed)."""
    rows = await pool.fetch(
        "SELECT id FROM jobs WHERE id = ANY($1::uuid[]) AND status IN ('succeeded', 'failed')",
        list(job_ids),
    )
    return {row["id"] for row in rows}


async def fail(
    pool: asyncpg.Pool, job_id: UUID, error: ErrorInfo, *, free_key: bool = False
) -> None:
    """Finalise a job that never reached the pipeline (it could not be enqueued, or its
    request cannot be read); ``free_key``: its idempotency key is freed, so that a retry
    with it is a new job, not this failure."""
    await pool.execute(
        """
        UPDATE jobs SET status = 'failed', error = $2, completed_at = now(), updated_at = now(),
            idempotency_key = CASE WHEN $3 THEN NULL ELSE idempotency_key END
        WHERE id = $1 AND status NOT IN ('succeeded', 'failed')
        """,
        job_id,
        error.model_dump(mode="json"),
        free_key,
    )


@dataclass(frozen=True)
class Outcome:
    """A job's final state after recording: ``fresh`` when this batch finalised it,
    ``replied`` when its reply was already published (by an earlier recording)."""

    job_id: UUID
    conversation_id: str
    status: str
    result: ChatCompletion | None
    error: dict[str, Any] | None
    fresh: bool
    replied: bool
    priority: str = "interactive"
    """The job's lane (``interactive`` or ``background``)."""
    completed_at: datetime | None = None
    """When the job turned final (by this batch when ``fresh``)."""
    reply_to: ReplyRoute | None = None
    """Where its reply goes, for a job from the submissions topic (its request's)."""
    tenant_id: str = "default"
    kind: JobKind = "chat"
    """``chat``, or ``summary`` for a summary the model writes."""
    summary_of: dict[str, Any] | None = None
    """For a summary job, the range of the conversation it summarises."""


@dataclass(frozen=True)
class Recorded:
    outcomes: list[Outcome]
    redrive: list[JobRequest]
    """Requests whose turn has come: publish them to the requests topic."""
    unembedded: list[tuple[int, str]] = field(default_factory=list)
    """Turns stored without an embedding (id, content): all but recall's query."""


RECORD = f"""
WITH input AS (
    -- traceparent is empty when untraced: unnest pads it with NULLs.
    -- Results come as JSON text (serialised once, by the model), cast here.
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[]::jsonb[], $4::jsonb[], $5::bigint[],
                         $6::bigint[], $15::timestamptz[], $16::timestamptz[],
                         $17::timestamptz[], $18::text[])
        AS u(id, status, result, error, prompt_tokens, completion_tokens, enriched_at,
             batched_at, generated_at, traceparent)
), fresh AS (
    UPDATE jobs SET status = input.status, result = input.result, error = input.error,
        completed_at = now(), updated_at = now(), usage_recorded_at = now(),
        query_embedding = NULL, enriched_at = input.enriched_at,
        batched_at = input.batched_at, generated_at = input.generated_at
    -- ``was``: the row as this statement found it, with the query embedding the claim kept.
    FROM input JOIN jobs AS was ON was.id = input.id
    WHERE jobs.id = input.id AND jobs.status NOT IN ('succeeded', 'failed')
    RETURNING jobs.id, jobs.conversation_id, jobs.status, jobs.result, jobs.error,
        jobs.kind, jobs.request->>'user' AS user_id, jobs.tenant_id, jobs.key_id, jobs.model,
        jobs.created_at, jobs.completed_at, jobs.batch_id, jobs.request->'webhook' AS webhook,
        jobs.webhook_secret, input.prompt_tokens, input.completion_tokens, input.traceparent,
        was.query_embedding, jobs.replied_at, jobs.request->>'priority' AS priority,
        jobs.request->'reply_to' AS reply_to, jobs.request->'metadata'->'summary' AS summary_of
), fresh_ids AS (
    -- The ledger's statistics say almost no job is open, so the planner expects one
    -- row of ``fresh``: what is looked up in it goes through one array (or one map),
    -- never a nested loop that rescans it for each row.
    SELECT coalesce(array_agg(id), '{{}}') AS ids FROM fresh
), replied AS (
    -- The previous batch's replies, published since: remembered now (one statement),
    -- with when each was published (the job's timeline).
    UPDATE jobs SET replied_at = coalesce(r.at, now())
    FROM unnest($13::uuid[], $19::timestamptz[]) AS r(id, at)
    WHERE jobs.id = r.id AND jobs.replied_at IS NULL
), usage_added AS (
    -- Each job's tokens, once: only a job this statement finalised counts.
    INSERT INTO usage AS u (tenant_id, key_id, model, period, requests, prompt_tokens,
        completion_tokens)
    SELECT tenant_id, coalesce(key_id, '{NIL_KEY}'::uuid), model,
        date_trunc('hour', completed_at), count(*), sum(prompt_tokens), sum(completion_tokens)
    FROM fresh
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant_id, key_id, model, period) DO UPDATE SET
        requests = u.requests + excluded.requests,
        prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = u.completion_tokens + excluded.completion_tokens,
        updated_at = now()
), deliveries AS (
    -- Each finalised job's webhook deliveries, once: to its own webhook and to each
    -- endpoint of its tenant subscribed to the event (chat jobs, not a batch's lines,
    -- whose batch's end event covers them, nor summaries). The dispatcher is woken.
    INSERT INTO webhook_deliveries (id, job_id, endpoint_id, event_type, url, secret,
        payload, attempts, cycle_attempts, next_attempt_at, leased_until, tenant_id,
        traceparent)
    SELECT gen_random_uuid(), f.id, t.endpoint_id, e.type, t.url, t.secret,
        jsonb_build_object(
            'type', e.type,
            'timestamp', f.completed_at,
            'data', jsonb_build_object(
                'id', f.id, 'status', f.status, 'conversation_id', f.conversation_id,
                'model', f.model, 'created_at', f.created_at,
                'completed_at', f.completed_at, 'result', f.result, 'error', f.error)),
        0, 0, now() + make_interval(secs => $14), NULL, f.tenant_id, f.traceparent
    FROM fresh f
    CROSS JOIN LATERAL (SELECT CASE f.status WHEN 'succeeded' THEN 'job.completed'
                                             ELSE 'job.failed' END AS type) e
    CROSS JOIN LATERAL (
        SELECT NULL::uuid AS endpoint_id, f.webhook->>'url' AS url, f.webhook_secret AS secret
        WHERE jsonb_typeof(f.webhook) = 'object'
        UNION ALL
        SELECT w.id, w.url, w.secret FROM webhook_endpoints w
        WHERE w.tenant_id = f.tenant_id AND f.batch_id IS NULL AND f.kind = 'chat'
            AND {SUBSCRIBED.format(type="e.type")}
    ) t
    ON CONFLICT DO NOTHING
    RETURNING 1
), woken AS (
    SELECT pg_notify('{DELIVERIES_CHANNEL}', '') WHERE EXISTS (SELECT 1 FROM deliveries)
), conv AS (
    -- Create the conversation if needed, and open its order gate to the next
    -- waiting turn when the turn in flight is the one just finalised (a turn in
    -- flight is always one of its own conversation's jobs: any finalised id will do).
    INSERT INTO conversations (id, user_id, tenant_id)
    SELECT DISTINCT ON (conversation_id) conversation_id, user_id, tenant_id FROM fresh
    ON CONFLICT (id) DO UPDATE SET
        updated_at = now(),
        user_id = coalesce(conversations.user_id, excluded.user_id),
        in_flight = CASE
            WHEN conversations.in_flight = ANY((SELECT ids FROM fresh_ids)::uuid[])
            THEN conversations.waiting[1] ELSE conversations.in_flight END,
        in_flight_since = CASE
            WHEN conversations.in_flight = ANY((SELECT ids FROM fresh_ids)::uuid[])
            THEN now() ELSE conversations.in_flight_since END,
        waiting = CASE
            WHEN conversations.in_flight = ANY((SELECT ids FROM fresh_ids)::uuid[])
            THEN conversations.waiting[2:] ELSE conversations.waiting END
    RETURNING id, in_flight, tenant_id
), owners AS (
    -- Each conversation's owner after the upsert, as one map.
    SELECT jsonb_object_agg(id, tenant_id) AS tenant FROM conv
), new_turns AS (
    -- Never into a conversation another tenant owns (one forgotten and re-created).
    SELECT t.job_id, t.role, t.content, t.tokens, t.ord, fresh.conversation_id,
        CASE WHEN t.is_query THEN fresh.query_embedding END AS embedding
    FROM unnest($7::uuid[], $8::text[], $9::text[], $10::int[], $11::int[], $12::bool[])
        AS t(job_id, role, content, tokens, ord, is_query)
    JOIN fresh ON fresh.id = t.job_id AND fresh.kind = 'chat'
    WHERE (SELECT tenant FROM owners) ->> fresh.conversation_id = fresh.tenant_id
), stored AS (
    INSERT INTO turns (conversation_id, seq, role, content, tokens, job_id, embedding)
    SELECT conversation_id,
        coalesce((SELECT max(seq) FROM turns x
                  WHERE x.conversation_id = new_turns.conversation_id), 0)
        + row_number() OVER (PARTITION BY conversation_id ORDER BY ord),
        role, content, tokens, job_id, embedding
    FROM new_turns
    RETURNING id, conversation_id, content, embedding IS NULL AS unembedded
), stale AS (
    -- The batch's jobs this statement did not finalise (final already: a duplicate
    -- completion), as one array: almost always empty, and then nothing below that
    -- reads by it touches a table.
    SELECT coalesce(array_agg(d.id), '{{}}') AS ids FROM unnest($1::uuid[]) AS d(id)
    WHERE NOT d.id = ANY((SELECT ids FROM fresh_ids)::uuid[])
), stale_gates AS MATERIALIZED (
    -- Their conversations' gates, found by job id. The statistics say almost no
    -- conversation has a turn in flight: filtered on that here, the planner would
    -- scan them all first.
    SELECT c.in_flight FROM jobs j JOIN conversations c ON c.id = j.conversation_id
    WHERE j.id = ANY((SELECT ids FROM stale)::uuid[])
), next_up AS (
    -- The turn each conversation's gate now admits: opened just now, or opened
    -- earlier by a recording whose redrive message may have been lost.
    SELECT in_flight AS id FROM conv WHERE in_flight IS NOT NULL
    UNION
    SELECT in_flight FROM stale_gates WHERE in_flight IS NOT NULL
)
-- A fresh job's result is the one this statement was given: not sent back.
SELECT 'outcome' AS part, f.id, f.conversation_id, true AS fresh, f.status, NULL::jsonb AS result,
    f.error, f.replied_at IS NOT NULL OR f.id = ANY($13::uuid[]) AS replied,
    NULL::jsonb AS request, coalesce(f.priority, 'interactive') AS priority, f.completed_at,
    f.reply_to, f.kind, f.summary_of, NULL::bigint AS turn_id, NULL::text AS content,
    f.tenant_id
FROM fresh f
UNION ALL
SELECT 'outcome', j.id, j.conversation_id, false, j.status, j.result, j.error,
    j.replied_at IS NOT NULL OR j.id = ANY($13::uuid[]), NULL,
    coalesce(j.request->>'priority', 'interactive'), j.completed_at, j.request->'reply_to',
    j.kind, j.request->'metadata'->'summary', NULL, NULL, j.tenant_id
FROM jobs j
WHERE j.id = ANY((SELECT ids FROM stale)::uuid[])
UNION ALL
-- By id, never by the status index: the ledger's statistics say no job is queued,
-- and a scan of every queued job costs as much as the backlog is long.
SELECT 'redrive', j.id, j.conversation_id, false, j.status, NULL, NULL, false,
    j.request, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM jobs j
WHERE j.id = ANY(ARRAY(SELECT id FROM next_up)) AND coalesce(j.status, '') = 'queued'
UNION ALL
-- The turns stored without an embedding (all but recall's query): embedded after the replies.
SELECT 'turn', NULL, s.conversation_id, true, NULL, NULL, NULL, false,
    NULL, NULL, NULL, NULL, NULL, NULL, s.id, s.content, NULL
FROM stored s
WHERE s.unembedded
"""


async def record(
    conn: asyncpg.Connection,
    completions: Sequence[JobCompletion],
    replied: Mapping[UUID, datetime] | None = None,
    webhook_first_delay_s: float = 0.0,
    traceparents: Mapping[UUID, str] | None = None,
) -> Recorded:
    """Finalise jobs, store their turns and open conversation order gates, in one
    statement; in the same statement, each finalised job's usage is counted and its
    webhook deliveries are created, and ``replied`` (jobs whose replies were published
    since the last recording, with when) are remembered as replied. A job turning final settles
    what its tenant's limits held for it (a trigger, migration 0013). Each job's
    timeline stamps (enriched, batched, generated) are stored from its completion;
    ``traceparents`` (each job's ``record`` span, when traced) go with its deliveries.

    Only jobs not yet final are updated and get turns; a duplicate completion
    leaves the ledger as it was and comes back with the stored result.
    """
    ids: list[UUID] = []
    statuses: list[str] = []
    results: list[str | None] = []
    errors: list[dict[str, Any] | None] = []
    prompt_tokens: list[int] = []
    completion_tokens: list[int] = []
    turn_jobs: list[UUID] = []
    turn_roles: list[str] = []
    turn_contents: list[str] = []
    turn_tokens: list[int] = []
    turn_order: list[int] = []
    turn_queries: list[bool] = []
    enriched: list[datetime | None] = []
    batched: list[datetime | None] = []
    generated: list[datetime | None] = []
    answers: dict[UUID, ChatCompletion] = {}
    seen: set[UUID] = set()
    for done in completions:
        if done.job_id in seen:
            continue  # the same job twice in one batch: the first answer wins
        seen.add(done.job_id)
        ids.append(done.job_id)
        statuses.append(done.status)
        if done.status == "succeeded":
            answer = answers[done.job_id] = ChatCompletion.from_completion(done)
            results.append(answer.model_dump_json())
        else:
            results.append(None)
        errors.append(done.error.model_dump(mode="json") if done.error else None)
        prompt_tokens.append(done.usage.prompt_tokens if done.usage else 0)
        completion_tokens.append(done.usage.completion_tokens if done.usage else 0)
        enriched.append(done.enriched_at)
        batched.append(done.batched_at)
        generated.append(done.generated_at)
        if done.status == "succeeded":
            users = [n for n, turn in enumerate(done.new_turns) if turn.role == "user"]
            for n, turn in enumerate(done.new_turns):
                turn_jobs.append(done.job_id)
                turn_roles.append(turn.role)
                turn_contents.append(turn.content)
                turn_tokens.append(turn.tokens)
                turn_order.append(len(turn_order))
                # The last user message was recall's query: it is stored with the
                # embedding the enricher searched with; the recorder embeds the rest after replying.
                turn_queries.append(bool(users) and n == users[-1])
    rows = await conn.fetch(
        RECORD,
        ids,
        statuses,
        results,
        errors,
        prompt_tokens,
        completion_tokens,
        turn_jobs,
        turn_roles,
        turn_contents,
        turn_tokens,
        turn_order,
        turn_queries,
        list(replied or ()),
        webhook_first_delay_s,
        enriched,
        batched,
        generated,
        [traceparents.get(job_id) for job_id in ids] if traceparents else [],
        list((replied or {}).values()),
    )
    outcomes = [
        Outcome(
            job_id=row["id"],
            conversation_id=row["conversation_id"],
            status=row["status"],
            result=answers.get(row["id"])
            if row["fresh"]
            else ChatCompletion.model_validate(row["result"])
            if row["result"]
            else None,
            error=row["error"],
            fresh=row["fresh"],
            replied=row["replied"],
            priority=row["priority"],
            completed_at=row["completed_at"],
            reply_to=ReplyRoute.model_validate(row["reply_to"]) if row["reply_to"] else None,
            tenant_id=row["tenant_id"],
            kind=row["kind"],
            summary_of=row["summary_of"],
        )
        for row in rows
        if row["part"] == "outcome"
    ]
    redrive = [
        JobRequest.model_validate(row["request"]) for row in rows if row["part"] == "redrive"
    ]
    unembedded = [(row["turn_id"], row["content"]) for row in rows if row["part"] == "turn"]
    return Recorded(outcomes=outcomes, redrive=redrive, unembedded=unembedded)


async def mark_replied(conn: asyncpg.Connection, replied: Mapping[UUID, datetime]) -> None:
    """Remember that these jobs' replies are published (at the times given): they are
    not published again."""
    ids = sorted(replied)
    await conn.execute(
        """
        UPDATE jobs SET replied_at = r.at
        FROM unnest($1::uuid[], $2::timestamptz[]) AS r(id, at)
        WHERE jobs.id = r.id AND jobs.replied_at IS NULL
        """,
        ids,
        [replied[job_id] for job_id in ids],
    )
