"""A job finalised while the enricher claims it (its batch cancelled meanwhile) is
never revived: the claim sets ``running`` only on a job still queued or running.

The claim reads its jobs first and updates each later; a cancel committing in
between turned ``failed`` jobs back into ``running`` ones, which then belonged to
neither the batch's output nor its errors.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from migrations import admit_batch

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIM = """        UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = now()
        WHERE jobs.id = j.id;"""
GUARDED = """        UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = now()
        WHERE jobs.id = j.id AND jobs.status IN ('queued', 'running');
        IF NOT FOUND THEN
            -- Finalised since it was read (0011): release its gate, never revive it.
            UPDATE conversations c SET in_flight = c.waiting[1], waiting = c.waiting[2:],
                in_flight_since = now()
            WHERE c.id = j.cid AND c.in_flight = j.id;
            CONTINUE;
        END IF;"""


def upgrade() -> None:
    admit_batch.replace(CLAIM, GUARDED)


def downgrade() -> None:
    admit_batch.replace(GUARDED, CLAIM)
