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

# Job ids are never NULL, so NOT IN is a plain anti-join; Postgres runs it as a
# hashed subplan over the old rows that were final (none, almost always).
SETTLE = """
CREATE OR REPLACE FUNCTION kontext_settle() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM 1 FROM new_jobs n
    WHERE n.status IN ('succeeded', 'failed')
        AND n.id NOT IN (SELECT o.id FROM old_jobs o WHERE o.status IN ('succeeded', 'failed'))
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;  -- no job turned final (a claim, a reply mark)
    END IF;
    WITH done AS (
        SELECT n.tenant_id, n.hold, n.window_second, n.window_tokens,
            coalesce((n.result->'usage'->>'total_tokens')::bigint, 0) AS tokens
        FROM new_jobs n
        WHERE n.status IN ('succeeded', 'failed')
            AND n.id NOT IN (
                SELECT o.id FROM old_jobs o WHERE o.status IN ('succeeded', 'failed'))
    ), by_tenant AS (
        SELECT tenant_id, sum(tokens) AS spent, sum(coalesce(hold, 0)) AS released
        FROM done GROUP BY tenant_id
    ), budgets AS (
        INSERT INTO tenant_budget_spent AS b (tenant_id, spent)
        SELECT tenant_id, spent FROM by_tenant ORDER BY tenant_id
        ON CONFLICT (tenant_id) DO UPDATE SET spent = b.spent + excluded.spent,
            reserved = greatest(b.reserved - (
                SELECT t.released FROM by_tenant t WHERE t.tenant_id = excluded.tenant_id), 0),
            updated_at = now()
    )
    UPDATE tenant_windows w SET tokens = greatest(w.tokens + c.delta, 0)
    FROM (SELECT tenant_id, window_second, sum(tokens - window_tokens) AS delta
          FROM done WHERE window_second IS NOT NULL GROUP BY tenant_id, window_second) c
    WHERE w.tenant_id = c.tenant_id AND w.second = c.window_second;
    RETURN NULL;
END
$fn$
"""


def upgrade() -> None:
    op.execute(SETTLE)


def downgrade() -> None:
    earlier = importlib.import_module("migrations.versions.0013_limits_in_postgres")
    op.execute(earlier.SETTLE.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
