"""Tokens each tenant has spent against its budget, kept by the admission stage.

The limiter's own state lives in a stream table (changelogged on Kafka); this
copy, written once per micro-batch that settles jobs, lets a limiter that lost
its changelog (e.g. the embedded in-memory broker restarted) resume each
tenant's spent budget instead of starting from zero.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenant_budget_spent",
        sa.Column(
            "tenant_id",
            sa.Text(),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("spent", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("tenant_budget_spent")
