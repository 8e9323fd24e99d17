"""Batch backfills: batches, each job's batch and custom_id, batch webhook deliveries.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = (
    "'validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', "
    "'cancelling', 'cancelled'"
)


def _timestamp(name: str, nullable: bool = True) -> sa.Column:  # type: ignore[type-arg]
    if nullable:
        return sa.Column(name, sa.DateTime(timezone=True))
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("status", sa.Text(), nullable=False, server_default="validating"),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("completion_window", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), unique=True),
        sa.Column("input_sha256", sa.Text(), nullable=False),
        sa.Column("metadata", postgresql.JSONB(), nullable=False, server_default="{}"),
        sa.Column("webhook", postgresql.JSONB()),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("errors", postgresql.JSONB(), nullable=False, server_default="[]"),
        _timestamp("created_at", nullable=False),
        _timestamp("updated_at", nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        _timestamp("in_progress_at"),
        _timestamp("finalizing_at"),
        _timestamp("completed_at"),
        _timestamp("failed_at"),
        _timestamp("expired_at"),
        _timestamp("cancelling_at"),
        _timestamp("cancelled_at"),
        _timestamp("notified_at"),
        sa.CheckConstraint(f"status IN ({STATUSES})", name="batches_status_valid"),
    )
    op.create_index("batches_status", "batches", ["status"])
    op.add_column(
        "jobs",
        sa.Column(
            "batch_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
        ),
    )
    op.add_column("jobs", sa.Column("custom_id", sa.Text()))
    op.create_index(
        "jobs_batch_status",
        "jobs",
        ["batch_id", "status"],
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    )
    op.alter_column("webhook_deliveries", "job_id", nullable=True)
    op.add_column(
        "webhook_deliveries",
        sa.Column(
            "batch_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            unique=True,
        ),
    )
    op.create_check_constraint(
        "webhook_deliveries_one_subject",
        "webhook_deliveries",
        "(job_id IS NULL) <> (batch_id IS NULL)",
    )


def downgrade() -> None:
    op.execute("DELETE FROM webhook_deliveries WHERE batch_id IS NOT NULL")
    op.drop_constraint("webhook_deliveries_one_subject", "webhook_deliveries")
    op.drop_column("webhook_deliveries", "batch_id")
    op.alter_column("webhook_deliveries", "job_id", nullable=False)
    op.drop_index("jobs_batch_status", table_name="jobs")
    op.drop_column("jobs", "custom_id")
    op.drop_column("jobs", "batch_id")
    op.drop_index("batches_status", table_name="batches")
    op.drop_table("batches")
