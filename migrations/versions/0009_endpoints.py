"""Webhook endpoints a tenant registers: every event of the tenant's jobs and batches
is delivered to each subscribed endpoint, signed with that endpoint's own secret.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.Text(),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("events", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index("webhook_endpoints_tenant", "webhook_endpoints", ["tenant_id"])
    op.add_column(
        "webhook_deliveries",
        sa.Column(
            "endpoint_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
        ),
    )
    # One delivery per job (or batch) for its own webhook, and one per subscribed endpoint.
    op.drop_constraint("webhook_deliveries_job_id_key", "webhook_deliveries", type_="unique")
    op.drop_constraint("webhook_deliveries_batch_id_key", "webhook_deliveries", type_="unique")
    for subject in ("job_id", "batch_id"):
        name = subject.removesuffix("_id")
        op.create_index(
            f"webhook_deliveries_{name}_own",
            "webhook_deliveries",
            [subject],
            unique=True,
            postgresql_where=sa.text("endpoint_id IS NULL"),
        )
        op.create_index(
            f"webhook_deliveries_{name}_endpoint",
            "webhook_deliveries",
            [subject, "endpoint_id"],
            unique=True,
            postgresql_where=sa.text("endpoint_id IS NOT NULL"),
        )


def downgrade() -> None:
    op.execute("DELETE FROM webhook_deliveries WHERE endpoint_id IS NOT NULL")
    for name in ("job", "batch"):
        op.drop_index(f"webhook_deliveries_{name}_endpoint", table_name="webhook_deliveries")
        op.drop_index(f"webhook_deliveries_{name}_own", table_name="webhook_deliveries")
    op.create_unique_constraint(
        "webhook_deliveries_batch_id_key", "webhook_deliveries", ["batch_id"]
    )
    op.create_unique_constraint("webhook_deliveries_job_id_key", "webhook_deliveries", ["job_id"])
    op.drop_column("webhook_deliveries", "endpoint_id")
    op.drop_index("webhook_endpoints_tenant", table_name="webhook_endpoints")
    op.drop_table("webhook_endpoints")
