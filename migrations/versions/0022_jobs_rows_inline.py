"""A job's row keeps its values inline: no TOAST for rows up to a page.

The claim stores the recall query's embedding (1.5 KB with 384 dimensions) in the
job's row until the recorder stores it with the user turn and clears it. That took
the row past the 2 KB at which Postgres moves its largest value to the TOAST table:
one TOAST row and index entry written at every claim and deleted at every recording
(420,000 TOAST inserts for as many jobs). A job's row, even with its embedding, its
request and its result, fits a page; it now stays whole in the heap.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE jobs SET (toast_tuple_target = 8160)")


def downgrade() -> None:
    op.execute("ALTER TABLE jobs RESET (toast_tuple_target)")
