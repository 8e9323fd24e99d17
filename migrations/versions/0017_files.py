"""Files uploaded through /v1/files (OpenAI Files API), scoped to a tenant; a batch's
input file and, once it has ended, its output and error files.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.Text(),
            sa.ForeignKey("tenants.id"),
            nullable=False,
            server_default="default",
        ),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint("purpose IN ('batch', 'batch_output')", name="files_purpose_valid"),
    )
    op.create_index("files_tenant_created", "files", ["tenant_id", "created_at"])
    for column in ("input_file_id", "output_file_id", "error_file_id"):
        op.add_column("batches", sa.Column(column, postgresql.UUID(as_uuid=True)))


def downgrade() -> None:
    for column in ("error_file_id", "output_file_id", "input_file_id"):
        op.drop_column("batches", column)
    op.drop_index("files_tenant_created", table_name="files")
    op.drop_table("files")
