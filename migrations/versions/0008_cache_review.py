"""Response cache and human review: cached deterministic answers, held results and
reviewer decisions; jobs may be ``needs_review``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from migrations import admit_batch

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status IN ('queued', 'running', 'succeeded', 'failed')"
NEW_STATUSES = "status IN ('queued', 'running', 'needs_review', 'succeeded', 'failed')"

# The admission function treats every status but queued/running as final and lets the
# conversation's next turn through; a held turn must keep holding it until reviewed.
FINAL_CHECK = "IF j.status NOT IN ('queued', 'running') THEN"
HELD_CHECK = (
    "IF j.status = 'needs_review' THEN CONTINUE; END IF; -- held for review (0008)\n"
    "        " + FINAL_CHECK
)


def upgrade() -> None:
    op.drop_constraint("jobs_status_valid", "jobs")
    op.create_check_constraint("jobs_status_valid", "jobs", NEW_STATUSES)
    definition = admit_batch.definition()
    if HELD_CHECK not in definition:
        op.execute(definition.replace(FINAL_CHECK, HELD_CHECK, 1))

    op.create_table(
        "response_cache",
        # Hex SHA-256 of tenant, model, max_tokens and the assembled prompt.
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.Text()),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("mean_logprob", sa.Float()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index("response_cache_created", "response_cache", ["created_at"])

    op.create_table(
        "reviews",
        sa.Column(
            "job_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("conversation_id", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False, server_default="pending"),
        sa.Column("reasons", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("mean_logprob", sa.Float()),
        sa.Column("request", postgresql.JSONB(), nullable=False),  # the turn's new messages
        sa.Column("original_output", sa.Text(), nullable=False),
        # The held JobCompletion; once decided, the one delivered.
        sa.Column("completion", postgresql.JSONB(), nullable=False),
        sa.Column("final_output", sa.Text()),
        sa.Column("reviewer", sa.Text()),
        sa.Column("note", sa.Text()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("decided_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "status IN ('pending', 'approved', 'replaced')", name="reviews_status_valid"
        ),
    )
    op.create_index("reviews_status_created", "reviews", ["status", "created_at"])
    op.create_index("reviews_tenant_status", "reviews", ["tenant_id", "status"])


def downgrade() -> None:
    op.drop_index("reviews_tenant_status", table_name="reviews")
    op.drop_index("reviews_status_created", table_name="reviews")
    op.drop_table("reviews")
    op.drop_index("response_cache_created", table_name="response_cache")
    op.drop_table("response_cache")
    definition = admit_batch.definition()
    if HELD_CHECK in definition:
        op.execute(definition.replace(HELD_CHECK, FINAL_CHECK, 1))
    # Held jobs go back to running: the reconciler publishes them again.
    op.execute("UPDATE jobs SET status = 'running' WHERE status = 'needs_review'")
    op.drop_constraint("jobs_status_valid", "jobs")
    op.create_check_constraint("jobs_status_valid", "jobs", OLD_STATUSES)
