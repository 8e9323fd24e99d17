"""Tenants' limits and budgets decided in Postgres, in the enricher's round trip.

The limiter was a stream processor keyed by tenant, with its state in a faust
table, an admission topic in front of the enricher and a settler feeding it
every completion: two more hops and a consumer per turn, and a ~30 s recovery
after a kill. Now each tenant's state is rows, and one function decides a
micro-batch under the tenant's row lock, so any number of enrichers cannot push
a tenant past a limit:

- ``tenant_windows``: requests and tokens counted per second over the last minute;
- ``tenant_budget_spent.reserved``: budget held by jobs admitted and not final;
- ``jobs.admitted_at``/``hold``/``window_second``/``window_tokens``: what a job
  reserved when it was admitted (a job is decided once: redelivered, it passes);
- ``kontext_settle``: a statement trigger that settles every job turning final
  (recorded, cancelled, expired, failed to enqueue): its hold released, its actual
  tokens added to the tenant's spend and, in the minute window, in place of its
  estimate;
- ``kontext_enrich``: limits, then the order gate and memory of the admitted jobs
  (``kontext_admit_batch``): still one round trip per micro-batch.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIMITS = """
CREATE FUNCTION kontext_limits(
    job_ids uuid[], costs int[], holds bigint[], now_s float8,
    default_rpm int, default_tpm int, default_budget bigint
) RETURNS TABLE (
    part text, job_id uuid, tenant_id text, code text, message text, status int,
    retry_after float8, blocked_until float8, blocked_by text, budget bigint, spent bigint
) LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    now_sec bigint := floor(now_s);
    t record;
    j record;
    state record;
    n_requests int;
    n_tokens bigint;
    oldest_request bigint;
    oldest_token bigint;
    held bigint;
    added_requests int;
    added_tokens bigint;
    wait float8;
    left_ bigint;
BEGIN
    -- Tenants in a stable order (row locks never deadlock between two enrichers);
    -- only those with a limit, and only jobs never decided before.
    FOR t IN
        SELECT x.id, x.rpm, x.tpm, x.budget FROM (
            SELECT DISTINCT jobs.tenant_id AS id, coalesce(tn.rpm, default_rpm) AS rpm,
                coalesce(tn.tpm, default_tpm) AS tpm,
                coalesce(tn.token_budget, default_budget) AS budget
            FROM unnest(job_ids) AS i(id) JOIN jobs ON jobs.id = i.id
            JOIN tenants tn ON tn.id = jobs.tenant_id
            WHERE jobs.admitted_at IS NULL AND jobs.status = 'queued'
        ) x
        WHERE x.rpm IS NOT NULL OR x.tpm IS NOT NULL OR x.budget IS NOT NULL
        ORDER BY x.id
    LOOP
        INSERT INTO tenant_budget_spent AS b (tenant_id) VALUES (t.id) ON CONFLICT DO NOTHING;
        SELECT b.spent, b.reserved INTO state
        FROM tenant_budget_spent b WHERE b.tenant_id = t.id FOR UPDATE;
        held := state.reserved;
        DELETE FROM tenant_windows w WHERE w.tenant_id = t.id AND w.second <= now_sec - 60;
        SELECT coalesce(sum(w.requests), 0), coalesce(sum(w.tokens), 0),
            min(w.second) FILTER (WHERE w.requests > 0), min(w.second) FILTER (WHERE w.tokens > 0)
        INTO n_requests, n_tokens, oldest_request, oldest_token
        FROM tenant_windows w WHERE w.tenant_id = t.id;
        added_requests := 0;
        added_tokens := 0;
        FOR j IN
            SELECT jobs.id, i.cost, i.hold, jobs.request->>'priority' = 'background' AS bg
            FROM unnest(job_ids, costs, holds) WITH ORDINALITY AS i(id, cost, hold, ord)
            JOIN jobs ON jobs.id = i.id
            WHERE jobs.tenant_id = t.id AND jobs.admitted_at IS NULL AND jobs.status = 'queued'
            ORDER BY i.ord
        LOOP
            -- A background job (a batch line, a summary) is paced by its lane, not by the
            -- per-minute limits; it holds budget like any job.
            IF NOT j.bg AND t.rpm IS NOT NULL AND n_requests >= t.rpm THEN
                wait := coalesce(oldest_request, now_sec) + 61 - now_s;
                RETURN QUERY SELECT 'refused', j.id, t.id, 'rate_limited',
                    format('rate limit of %s requests per minute reached; retry after %s s',
                        t.rpm, ceil(wait)), 429, wait,
                    NULL::float8, NULL::text, NULL::bigint, NULL::bigint;
                CONTINUE;
            END IF;
            IF NOT j.bg AND t.tpm IS NOT NULL AND j.cost > t.tpm THEN
                RETURN QUERY SELECT 'refused', j.id, t.id, 'rate_limited',
                    format('the request may use %s tokens, over the limit of %s tokens per '
                        'minute; lower max_tokens', j.cost, t.tpm), 422, NULL::float8,
                    NULL::float8, NULL::text, NULL::bigint, NULL::bigint;
                CONTINUE;
            END IF;
            IF NOT j.bg AND t.tpm IS NOT NULL AND n_tokens + j.cost > t.tpm THEN
                wait := coalesce(oldest_token, now_sec) + 61 - now_s;
                RETURN QUERY SELECT 'refused', j.id, t.id, 'rate_limited',
                    format('rate limit of %s tokens per minute reached; retry after %s s',
                        t.tpm, ceil(wait)), 429, wait,
                    NULL::float8, NULL::text, NULL::bigint, NULL::bigint;
                CONTINUE;
            END IF;
            IF t.budget IS NOT NULL THEN
                left_ := t.budget - state.spent - held;
                IF j.hold > left_ THEN
                    RETURN QUERY SELECT 'refused', j.id, t.id, 'budget_exhausted',
                        format('the token budget of %s has %s tokens left (not spent nor '
                            'held by jobs in flight); this request may use %s',
                            t.budget, greatest(left_, 0), j.hold), 402, NULL::float8,
                        NULL::float8, NULL::text, NULL::bigint, NULL::bigint;
                    CONTINUE;
                END IF;
                held := held + j.hold;
            END IF;
            IF j.bg OR (t.rpm IS NULL AND t.tpm IS NULL) THEN
                UPDATE jobs SET admitted_at = now(),
                    hold = CASE WHEN t.budget IS NOT NULL THEN j.hold END
                WHERE jobs.id = j.id;
            ELSE
                n_requests := n_requests + 1;
                n_tokens := n_tokens + j.cost;
                oldest_request := coalesce(oldest_request, now_sec);
                oldest_token := coalesce(oldest_token, now_sec);
                added_requests := added_requests + 1;
                added_tokens := added_tokens + j.cost;
                UPDATE jobs SET admitted_at = now(),
                    hold = CASE WHEN t.budget IS NOT NULL THEN j.hold END,
                    window_second = now_sec, window_tokens = j.cost
                WHERE jobs.id = j.id;
            END IF;
        END LOOP;
        UPDATE tenant_budget_spent b SET reserved = held, updated_at = now()
        WHERE b.tenant_id = t.id;
        IF added_requests > 0 THEN
            INSERT INTO tenant_windows AS w (tenant_id, second, requests, tokens)
            VALUES (t.id, now_sec, added_requests, added_tokens)
            ON CONFLICT ON CONSTRAINT tenant_windows_pkey DO UPDATE
            SET requests = w.requests + excluded.requests, tokens = w.tokens + excluded.tokens;
        END IF;
        -- What the API may know for sure, to refuse early: a window full until when,
        -- the budget spent.
        RETURN QUERY SELECT 'tenant', NULL::uuid, t.id, NULL::text, NULL::text, NULL::int,
            NULL::float8,
            CASE WHEN t.rpm IS NOT NULL AND n_requests >= t.rpm
                    THEN (coalesce(oldest_request, now_sec) + 61)::float8
                 WHEN t.tpm IS NOT NULL AND n_tokens >= t.tpm
                    THEN (coalesce(oldest_token, now_sec) + 61)::float8 END,
            CASE WHEN t.rpm IS NOT NULL AND n_requests >= t.rpm THEN 'rpm'
                 WHEN t.tpm IS NOT NULL AND n_tokens >= t.tpm THEN 'tpm' END,
            t.budget, state.spent;
    END LOOP;
END
$fn$
"""

SETTLE = """
CREATE FUNCTION kontext_settle() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM 1 FROM new_jobs n JOIN old_jobs o ON o.id = n.id
    WHERE n.status IN ('succeeded', 'failed') AND o.status NOT IN ('succeeded', 'failed')
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;  -- no job turned final (a claim, a reply mark)
    END IF;
    WITH done AS (
        SELECT n.tenant_id, n.hold, n.window_second, n.window_tokens,
            coalesce((n.result->'usage'->>'total_tokens')::bigint, 0) AS tokens
        FROM new_jobs n JOIN old_jobs o ON o.id = n.id
        WHERE n.status IN ('succeeded', 'failed') AND o.status NOT IN ('succeeded', 'failed')
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

ENRICH = """
CREATE FUNCTION kontext_enrich(
    job_ids uuid[], queries text[], costs int[], holds bigint[], now_s float8,
    default_rpm int, default_tpm int, default_budget bigint, limited boolean,
    recent_turns int, recall_k int, lease interval
) RETURNS TABLE (
    part text, job_id uuid, conversation_id text, seq int, role text, content text,
    tokens int, similarity float8, level int, first_seq int, last_seq int,
    tenant_id text, code text, status int, retry_after float8, blocked_until float8,
    blocked_by text, budget bigint, spent bigint
) LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    refused uuid[] := '{}';
    l record;
BEGIN
    IF limited THEN
        FOR l IN
            SELECT * FROM kontext_limits(
                job_ids, costs, holds, now_s, default_rpm, default_tpm, default_budget)
        LOOP
            IF l.part = 'refused' THEN
                refused := refused || l.job_id;
            END IF;
            RETURN QUERY SELECT l.part, l.job_id, NULL::text, NULL::int, NULL::text,
                l.message, NULL::int, NULL::float8, NULL::int, NULL::int, NULL::int,
                l.tenant_id, l.code, l.status, l.retry_after, l.blocked_until, l.blocked_by,
                l.budget, l.spent;
        END LOOP;
    END IF;
    RETURN QUERY
    SELECT a.part, a.job_id, a.conversation_id, a.seq, a.role, a.content, a.tokens,
        a.similarity, a.level, a.first_seq, a.last_seq, NULL::text, NULL::text, NULL::int,
        NULL::float8, NULL::float8, NULL::text, NULL::bigint, NULL::bigint
    FROM kontext_admit_batch(
        ARRAY(SELECT i.id FROM unnest(job_ids) WITH ORDINALITY AS i(id, ord)
              WHERE NOT i.id = ANY(refused) ORDER BY i.ord),
        ARRAY(SELECT i.q FROM unnest(job_ids, queries) WITH ORDINALITY AS i(id, q, ord)
              WHERE NOT i.id = ANY(refused) ORDER BY i.ord),
        recent_turns, recall_k, lease) a;
END
$fn$
"""


def upgrade() -> None:
    op.add_column("jobs", sa.Column("admitted_at", sa.DateTime(timezone=True)))
    op.add_column("jobs", sa.Column("hold", sa.BigInteger()))
    op.add_column("jobs", sa.Column("window_second", sa.BigInteger()))
    op.add_column("jobs", sa.Column("window_tokens", sa.Integer()))
    op.add_column(
        "tenant_budget_spent",
        sa.Column("reserved", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "tenant_windows",
        sa.Column(
            "tenant_id",
            sa.Text(),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("second", sa.BigInteger(), primary_key=True),
        sa.Column("requests", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("tokens", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.execute(LIMITS)
    op.execute(SETTLE)
    op.execute(
        "CREATE TRIGGER jobs_settle AFTER UPDATE ON jobs "
        "REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs "
        "FOR EACH STATEMENT EXECUTE FUNCTION kontext_settle()"
    )
    op.execute(ENRICH)


def downgrade() -> None:
    op.execute("DROP FUNCTION kontext_enrich")
    op.execute("DROP TRIGGER jobs_settle ON jobs")
    op.execute("DROP FUNCTION kontext_settle")
    op.execute("DROP FUNCTION kontext_limits")
    op.drop_table("tenant_windows")
    op.drop_column("tenant_budget_spent", "reserved")
    for column in ("window_tokens", "window_second", "hold", "admitted_at"):
        op.drop_column("jobs", column)
