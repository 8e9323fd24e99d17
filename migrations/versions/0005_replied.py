"""Jobs remember that their reply was published, so a job is answered once.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("replied_at", sa.DateTime(timezone=True)))
    # Jobs finished before this column existed were answered then.
    op.execute("UPDATE jobs SET replied_at = completed_at WHERE status IN ('succeeded', 'failed')")


def downgrade() -> None:
    op.drop_column("jobs", "replied_at")
