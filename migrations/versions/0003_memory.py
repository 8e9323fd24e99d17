"""Conversation memory: summaries, HNSW recall index, job kinds and users.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("kind", sa.Text(), nullable=False, server_default="chat"))
    op.create_check_constraint("jobs_kind_valid", "jobs", "kind IN ('chat', 'summary')")
    op.add_column("conversations", sa.Column("user_id", sa.Text()))
    # The order gate: one chat turn of a conversation in flight, the rest waiting in order.
    op.add_column("conversations", sa.Column("in_flight", sa.Uuid()))
    op.add_column("conversations", sa.Column("in_flight_since", sa.DateTime(timezone=True)))
    op.add_column(
        "conversations",
        sa.Column("waiting", sa.ARRAY(sa.Uuid()), nullable=False, server_default="{}"),
    )
    op.create_index("conversations_user", "conversations", ["user_id"])
    op.create_table(
        "summaries",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column(
            "conversation_id",
            sa.Text(),
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("first_seq", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("rolled_up", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.UniqueConstraint(
            "conversation_id", "level", "first_seq", name="summaries_conversation_level_first"
        ),
    )
    op.execute(
        "CREATE INDEX turns_embedding_hnsw ON turns "
        "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )
    op.execute(
        "CREATE INDEX turns_unembedded ON turns (conversation_id, seq) WHERE embedding IS NULL"
    )
    op.execute(ADMIT_BATCH)


# One round trip per enrichment micro-batch. Each statement in a plpgsql function
# takes a fresh snapshot, so the context read after the order gate sees every turn
# committed before this job was let through.
ADMIT_BATCH = """
CREATE FUNCTION kontext_admit_batch(
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
            jobs.request->>'user' AS user_id, jobs.request->>'recall_scope' AS scope
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
                    SELECT cc.id FROM conversations cc WHERE cc.user_id = c.user_id)))
        ORDER BY tt.embedding <=> c.query LIMIT recall_k
    ) t;
END
$fn$;
"""


def downgrade() -> None:
    op.execute("DROP FUNCTION kontext_admit_batch")
    op.drop_column("conversations", "waiting")
    op.drop_column("conversations", "in_flight_since")
    op.drop_column("conversations", "in_flight")
    op.drop_index("turns_unembedded", table_name="turns")
    op.drop_index("turns_embedding_hnsw", table_name="turns")
    op.drop_table("summaries")
    op.drop_index("conversations_user", table_name="conversations")
    op.drop_column("conversations", "user_id")
    op.drop_constraint("jobs_kind_valid", "jobs")
    op.drop_column("jobs", "kind")
