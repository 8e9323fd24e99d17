"""Tenants and API keys; every job, conversation, batch and delivery owned by a tenant;
usage per tenant, key, model and hour.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNED = ("jobs", "conversations", "batches", "webhook_deliveries")


def _tenant_column() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        "tenant_id",
        sa.Text(),
        sa.ForeignKey("tenants.id"),
        nullable=False,
        server_default="default",
    )


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        # Policy settings (read by the admission policies): NULL is no limit.
        sa.Column("rpm", sa.Integer()),
        sa.Column("tpm", sa.Integer()),
        sa.Column("token_budget", sa.BigInteger()),
        sa.Column("cache_opt_out", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.execute("INSERT INTO tenants (id, name) VALUES ('default', 'default')")
    op.create_table(
        "api_keys",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.Text(),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("prefix", sa.Text(), nullable=False, unique=True),
        sa.Column("hash", sa.Text(), nullable=False, unique=True),
        sa.Column("operator", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    for table in OWNED:
        op.add_column(table, _tenant_column())
    op.add_column("jobs", sa.Column("key_id", postgresql.UUID(as_uuid=True)))
    op.add_column("jobs", sa.Column("usage_recorded_at", sa.DateTime(timezone=True)))
    op.add_column("batches", sa.Column("key_id", postgresql.UUID(as_uuid=True)))
    # Idempotency keys are each tenant's own.
    for table in ("jobs", "batches"):
        op.drop_constraint(f"{table}_idempotency_key_key", table)
        op.create_unique_constraint(
            f"{table}_tenant_idempotency_key", table, ["tenant_id", "idempotency_key"]
        )
    op.create_index("conversations_tenant_user", "conversations", ["tenant_id", "user_id"])
    op.create_table(
        "usage",
        sa.Column(
            "tenant_id",
            sa.Text(),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        # The submitting key; the nil UUID for work no key submitted (summaries).
        sa.Column("key_id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("model", sa.Text(), primary_key=True),
        sa.Column("period", sa.DateTime(timezone=True), primary_key=True),  # the hour
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.execute(ADMIT_BATCH)


# As in 0003, and user-scope recall only looks at the same tenant's conversations.
ADMIT_BATCH = """
CREATE OR REPLACE FUNCTION kontext_admit_batch(
    job_ids uuid[], queries text[], recent_turns int, recall_k int, lease interval
) RETURNS TABLE (
    part text, job_id uuid, conversation_id text, seq int, role text, content text,
    tokens int, similarity float8, level int, first_seq int, last_seq int
) LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    j record;
    conv record;
    admitted uuid[] := '{}';
BEGIN
    FOR j IN
        SELECT jobs.id, jobs.conversation_id AS cid, jobs.kind, jobs.status
        FROM unnest(job_ids) WITH ORDINALITY AS i(id, ord) JOIN jobs ON jobs.id = i.id
        ORDER BY i.ord
    LOOP
        IF j.status NOT IN ('queued', 'running') THEN
            -- Already final (a redelivered message): release the gate if it holds this job.
            UPDATE conversations c SET in_flight = c.waiting[1], waiting = c.waiting[2:],
                in_flight_since = now()
            WHERE c.id = j.cid AND c.in_flight = j.id;
            CONTINUE;
        END IF;
        IF j.kind = 'chat' THEN
            SELECT * INTO conv FROM conversations c WHERE c.id = j.cid FOR UPDATE;
            IF conv.in_flight IS NOT NULL AND conv.in_flight <> j.id
               AND conv.in_flight_since > now() - lease THEN
                IF NOT j.id = ANY(conv.waiting) THEN
                    UPDATE conversations c SET waiting = array_append(c.waiting, j.id)
                    WHERE c.id = j.cid;
                END IF;
                CONTINUE;
            END IF;
            UPDATE conversations c SET in_flight = j.id, in_flight_since = now(),
                waiting = array_remove(c.waiting, j.id)
            WHERE c.id = j.cid;
        END IF;
        UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = now()
        WHERE jobs.id = j.id;
        admitted := admitted || j.id;
    END LOOP;

    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(job_ids, queries) AS i(id, query)
    ), claimed AS (
        SELECT jobs.id, jobs.conversation_id AS cid, jobs.kind, input.query::vector AS query,
            jobs.request->>'user' AS user_id, jobs.request->>'recall_scope' AS scope,
            jobs.tenant_id
        FROM jobs JOIN input ON input.id = jobs.id WHERE jobs.id = ANY(admitted)
    ), chats AS (
        SELECT c.*, coalesce((SELECT max(t.seq) FROM turns t WHERE t.conversation_id = c.cid), 0)
            AS top_seq
        FROM claimed c WHERE c.kind = 'chat'
    )
    SELECT 'claimed'::text, c.id, c.cid, NULL::int, NULL::text, NULL::text, NULL::int,
        NULL::float8, NULL::int, NULL::int, NULL::int
    FROM claimed c
    UNION ALL
    SELECT 'recent', c.id, c.cid, t.seq, t.role, t.content, t.tokens,
        1 - (t.embedding <=> c.query), NULL, NULL, NULL
    FROM chats c CROSS JOIN LATERAL (
        SELECT tt.seq, tt.role, tt.content, tt.tokens, tt.embedding FROM turns tt
        WHERE tt.conversation_id = c.cid ORDER BY tt.seq DESC LIMIT recent_turns
    ) t
    UNION ALL
    SELECT 'summary', c.id, c.cid, NULL, NULL, s.content, s.tokens, NULL,
        s.level, s.first_seq, s.last_seq
    FROM chats c JOIN summaries s ON s.conversation_id = c.cid AND NOT s.rolled_up
    UNION ALL
    SELECT 'recall', c.id, t.conversation_id, t.seq, t.role, t.content, t.tokens,
        1 - t.distance, NULL, NULL, NULL
    FROM chats c CROSS JOIN LATERAL (
        SELECT tt.conversation_id, tt.seq, tt.role, tt.content, tt.tokens,
            tt.embedding <=> c.query AS distance
        FROM turns tt
        WHERE c.query IS NOT NULL AND tt.embedding IS NOT NULL AND (
            (tt.conversation_id = c.cid AND tt.seq <= c.top_seq - recent_turns)
            OR (c.scope = 'user' AND c.user_id IS NOT NULL AND tt.conversation_id <> c.cid
                AND tt.conversation_id IN (
                    SELECT cc.id FROM conversations cc
                    WHERE cc.user_id = c.user_id AND cc.tenant_id = c.tenant_id)))
        ORDER BY tt.embedding <=> c.query LIMIT recall_k
    ) t;
END
$fn$;
"""


def _admit_batch_0003() -> str:
    path = Path(__file__).with_name("0003_memory.py")
    spec = importlib.util.spec_from_file_location("kontext_migration_0003", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text: str = module.ADMIT_BATCH
    return text.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def downgrade() -> None:
    op.execute(_admit_batch_0003())
    op.drop_table("usage")
    op.drop_index("conversations_tenant_user", table_name="conversations")
    for table in ("jobs", "batches"):
        op.drop_constraint(f"{table}_tenant_idempotency_key", table)
        op.create_unique_constraint(f"{table}_idempotency_key_key", table, ["idempotency_key"])
    op.drop_column("batches", "key_id")
    op.drop_column("jobs", "usage_recorded_at")
    op.drop_column("jobs", "key_id")
    for table in OWNED:
        op.drop_column(table, "tenant_id")
    op.drop_table("api_keys")
    op.drop_table("tenants")
