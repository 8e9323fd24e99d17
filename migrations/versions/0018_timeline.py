"""Each job's timeline, written by the statements that already touch its row, and
the trace context of its webhook deliveries.

``jobs.claimed_at`` is set by the enricher's claim (``kontext_admit_batch``'s one
UPDATE, 0016); ``enriched_at`` / ``batched_at`` / ``generated_at`` travel in the
job's completion and are stored by the recorder's statement that finalises it. With
``created_at``, ``completed_at``, ``replied_at`` and the deliveries' ``delivered_at``
they make the timeline ``GET /v1/jobs/{id}?timeline=true`` returns: no statement of
its own. ``webhook_deliveries.traceparent`` (the job's ``record`` span, when traced)
makes each delivery attempt a span of the job's trace.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations import admit_batch

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STAGES = ("claimed_at", "enriched_at", "batched_at", "generated_at")

CLAIM = """            query_embedding = i.query
        FROM unnest(job_ids, queries) AS i(id, query)"""
CLAIM_STAMPED = """            query_embedding = i.query, claimed_at = now()
        FROM unnest(job_ids, queries) AS i(id, query)"""


def upgrade() -> None:
    for column in STAGES:
        op.add_column("jobs", sa.Column(column, sa.DateTime(timezone=True)))
    op.add_column("webhook_deliveries", sa.Column("traceparent", sa.Text()))
    admit_batch.replace(CLAIM, CLAIM_STAMPED)


def downgrade() -> None:
    admit_batch.replace(CLAIM_STAMPED, CLAIM)
    op.drop_column("webhook_deliveries", "traceparent")
    for column in reversed(STAGES):
        op.drop_column("jobs", column)
