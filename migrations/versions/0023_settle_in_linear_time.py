"""The settle trigger finds the jobs turning final in one pass, not a scan per job.

``kontext_settle`` (migration 0013) joined the statement's new rows to its old rows
on the job id. Transition tables have no statistics and no index: the planner
chose a nested loop, each new row against every old one, so a recording of n jobs
made n² comparisons (250,000 and ~15 ms of Postgres time for a batch of 500). The
old rows that were final already now go into one hashed lookup, read once.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-04
"""

import importlib
from collections.abc import Sequence

from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EARLIER = importlib.import_module("migrations.versions.0013_limits_in_postgres").SETTLE
"""The function as 0013 created it (no migration since has changed it)."""

# Both of its queries change the same way. Job ids are never NULL, so NOT IN is a plain
# anti-join; Postgres runs it as a hashed subplan over the old rows that were final
# (none, almost always).
JOIN = ("FROM new_jobs n JOIN old_jobs o ON o.id = n.id", "FROM new_jobs n")
OLD_NOT_FINAL = (
    "AND o.status NOT IN ('succeeded', 'failed')",
    "AND n.id NOT IN (SELECT o.id FROM old_jobs o WHERE o.status IN ('succeeded', 'failed'))",
)


def _replace_function(text: str) -> str:
    return text.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def upgrade() -> None:
    settle = _replace_function(EARLIER)
    for old, new in (JOIN, OLD_NOT_FINAL):
        assert settle.count(old) == 2, "kontext_settle is not as 0013 wrote it"
        settle = settle.replace(old, new)
    op.execute(settle)


def downgrade() -> None:
    op.execute(_replace_function(EARLIER))
