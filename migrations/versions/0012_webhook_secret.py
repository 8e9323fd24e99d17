"""A job's own webhook secret has its own column, out of the request JSON.

The request JSON is what travels the topics when a job is re-driven or released
behind an earlier turn, so a secret kept inside it leaked onto them.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("webhook_secret", sa.Text()))
    op.execute(
        """
        UPDATE jobs SET webhook_secret = request->'webhook'->>'secret',
            request = request #- '{webhook,secret}'
        WHERE request->'webhook' ? 'secret'
        """
    )


def downgrade() -> None:
    op.execute(
        """
        UPDATE jobs SET request = jsonb_set(request, '{webhook,secret}', to_jsonb(webhook_secret))
        WHERE webhook_secret IS NOT NULL AND jsonb_typeof(request->'webhook') = 'object'
        """
    )
    op.drop_column("jobs", "webhook_secret")
