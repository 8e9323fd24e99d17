"""The claim passes the order gate in one UPDATE for turns alone in their batch.

``kontext_admit_batch`` passed each job through its conversation's order gate in
its loop: per chat turn, a ``SELECT ... FOR UPDATE`` of the conversation and an
UPDATE, two statements a turn. Under load nearly every turn of a batch is the only
one of its conversation there and still open, so one UPDATE now takes the gate
for all of those (or queues each behind the turn in flight): each row is locked as
it is updated and the gate decided on its latest version, as the loop did under
its row lock. The loop takes the rest, in batch order as before: several turns of
one conversation, jobs already final (which release the gate), jobs held for
review, summaries.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from migrations import admit_batch

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOOP = """    claimed_ids uuid[];
BEGIN
    FOR j IN
        SELECT jobs.id, jobs.conversation_id AS cid, jobs.kind, jobs.status, i.query
        FROM unnest(job_ids, queries) WITH ORDINALITY AS i(id, query, ord)
        JOIN jobs ON jobs.id = i.id
        ORDER BY i.ord
    LOOP"""

HELD = """coalesce(c.in_flight IS NOT NULL AND c.in_flight <> b.id
                AND c.in_flight_since > now() - lease, false)"""
"""Another turn of the conversation is in flight, within the ordering lease."""

ONE_UPDATE_THEN_LOOP = f"""    claimed_ids uuid[];
    gated uuid[];
BEGIN
    -- Open chat turns alone in the batch with their conversation: one UPDATE passes
    -- each through the gate or queues it behind the turn in flight (0021).
    WITH batch AS (
        SELECT jobs.id, jobs.conversation_id AS cid, jobs.kind, jobs.status,
            count(*) OVER (PARTITION BY jobs.conversation_id) AS n
        FROM jobs WHERE jobs.id = ANY(job_ids)
    ), passing AS (
        UPDATE conversations c SET
            in_flight = CASE WHEN {HELD} THEN c.in_flight ELSE b.id END,
            in_flight_since = CASE WHEN {HELD} THEN c.in_flight_since ELSE now() END,
            waiting = CASE
                WHEN NOT {HELD} THEN array_remove(c.waiting, b.id)
                WHEN b.id = ANY(c.waiting) THEN c.waiting
                ELSE array_append(c.waiting, b.id) END
        FROM batch b
        WHERE c.id = b.cid AND b.n = 1 AND b.kind = 'chat'
            AND b.status IN ('queued', 'running')
        RETURNING b.id, c.in_flight = b.id AS passed
    )
    SELECT coalesce(array_agg(id) FILTER (WHERE passed), '{{}}'),
        coalesce(array_agg(id), '{{}}')
    INTO admitted, gated FROM passing;
    FOR j IN
        SELECT jobs.id, jobs.conversation_id AS cid, jobs.kind, jobs.status, i.query
        FROM unnest(job_ids, queries) WITH ORDINALITY AS i(id, query, ord)
        JOIN jobs ON jobs.id = i.id
        WHERE NOT i.id = ANY(gated)
        ORDER BY i.ord
    LOOP"""


BY_STATUS = """        WHERE jobs.id = ANY(admitted)
            AND jobs.status IN ('queued', 'running')"""
BY_ID = """        WHERE jobs.id = ANY(admitted)
            -- An expression no index has: the planner reads the jobs by id, never by
            -- the status index, whose open entries (and dead ones, until vacuum) it
            -- takes for a handful (0021).
            AND coalesce(jobs.status, '') IN ('queued', 'running')"""


def upgrade() -> None:
    admit_batch.replace(LOOP, ONE_UPDATE_THEN_LOOP)
    admit_batch.replace(BY_STATUS, BY_ID)


def downgrade() -> None:
    admit_batch.replace(BY_ID, BY_STATUS)
    admit_batch.replace(ONE_UPDATE_THEN_LOOP, LOOP)
