"""The claim finds each job's recall query by its position in the batch, not by a join.

``kontext_admit_batch``'s one UPDATE (0016) joined ``jobs`` to the unnested batch.
The jobs ledger's statistics say almost no job is open, so the planner expected one
row, read the open jobs by their status index and scanned the whole batch again for
each of them: for a batch of 105, 10,920 rows compared and 13 of the statement's
26 ms. Looking each job's query up in the array (``array_position``) costs the same
whatever the planner expects.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from migrations import admit_batch

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOINED = """            query_embedding = i.query, claimed_at = now()
        FROM unnest(job_ids, queries) AS i(id, query)
        WHERE jobs.id = i.id AND jobs.id = ANY(admitted)"""
LOOKED_UP = """            query_embedding = queries[array_position(job_ids, jobs.id)],
            claimed_at = now()
        WHERE jobs.id = ANY(admitted)"""


def upgrade() -> None:
    admit_batch.replace(JOINED, LOOKED_UP)


def downgrade() -> None:
    admit_batch.replace(LOOKED_UP, JOINED)
