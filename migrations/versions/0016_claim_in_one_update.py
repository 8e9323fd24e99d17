"""The claim sets its jobs running in one UPDATE, and the jobs ledger leaves room
on its pages for updates in place.

``kontext_admit_batch`` updated each admitted job with its own statement inside its
loop, and every UPDATE statement on ``jobs`` also runs the settling trigger (0013):
per job, a statement and a trigger. The loop now only passes the order gate; one
UPDATE after it claims every admitted job still open (one finalised since it was
read is not revived, and its gate is released: 0011). A job's row is written four
times (queued, running, final, replied); with ``fillfactor`` 70 a later version can
often stay on its page, so the update that changes no indexed column (the reply
mark) writes no index entry.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

from migrations import admit_batch

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DECLARED = """    admitted uuid[] := '{}';
BEGIN"""
DECLARED_CLAIMED = """    admitted uuid[] := '{}';
    claimed_ids uuid[];
BEGIN"""

PER_JOB = """        -- Only a job still open: one finalised since it was read stays so (0011).
        UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = now(),
            query_embedding = j.query
        WHERE jobs.id = j.id AND jobs.status IN ('queued', 'running');
        IF NOT FOUND THEN
            UPDATE conversations c SET in_flight = c.waiting[1], waiting = c.waiting[2:],
                in_flight_since = now()
            WHERE c.id = j.cid AND c.in_flight = j.id;
            CONTINUE;
        END IF;
        admitted := admitted || j.id;
    END LOOP;
"""
ONE_UPDATE = """        admitted := admitted || j.id;
    END LOOP;
    -- One UPDATE claims them all (0016); only a job still open: one finalised since it
    -- was read is never revived, and its gate is released (0011).
    WITH claimed AS (
        UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = now(),
            query_embedding = i.query
        FROM unnest(job_ids, queries) AS i(id, query)
        WHERE jobs.id = i.id AND jobs.id = ANY(admitted)
            AND jobs.status IN ('queued', 'running')
        RETURNING jobs.id
    )
    SELECT coalesce(array_agg(claimed.id), '{}') INTO claimed_ids FROM claimed;
    UPDATE conversations c SET in_flight = c.waiting[1], waiting = c.waiting[2:],
        in_flight_since = now()
    FROM jobs WHERE jobs.id = ANY(admitted) AND NOT jobs.id = ANY(claimed_ids)
        AND c.id = jobs.conversation_id AND c.in_flight = jobs.id;
    admitted := claimed_ids;
"""


def upgrade() -> None:
    admit_batch.replace(DECLARED, DECLARED_CLAIMED)
    admit_batch.replace(PER_JOB, ONE_UPDATE)
    op.execute("ALTER TABLE jobs SET (fillfactor = 70)")


def downgrade() -> None:
    op.execute("ALTER TABLE jobs RESET (fillfactor)")
    admit_batch.replace(ONE_UPDATE, PER_JOB)
    admit_batch.replace(DECLARED_CLAIMED, DECLARED)
