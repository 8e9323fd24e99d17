"""A partial index of the summary jobs still open, by conversation.

The memory worker asks, for each conversation of its batch, whether a summary job
is queued or running. The planner answered it by intersecting the conversation's
jobs with the status index, whose entries for ``queued`` and ``running`` (a new one
for each of a job's four writes, until vacuum) ran to 18,000 on a database a dozen
benchmark runs had written without a vacuum: 1 ms per conversation. Only summary
jobs that are open enter this index.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "jobs_open_summaries",
        "jobs",
        ["conversation_id"],
        postgresql_where=sa.text("kind = 'summary' AND status IN ('queued', 'running')"),
    )


def downgrade() -> None:
    op.drop_index("jobs_open_summaries", table_name="jobs")
