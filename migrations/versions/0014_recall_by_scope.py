"""Recall reads its scope through the indexes that bound it, and the HNSW index goes.

Recall is an exact search within its scope (0010): the conversation's older turns,
and with ``recall_scope=user`` the user's other conversations. Written as one
condition with an OR, the planner could use neither the (conversation, seq) index
nor the user's conversations, and scanned every turn of every conversation for
each job: a cost that grew with the table. Now each scope is its own branch,
each read through its own index. The HNSW index over all turns served no query
(0010 made recall exact on purpose) while every turn stored paid for its insert
into the graph: it is dropped.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

from migrations import admit_batch

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ONE_CONDITION = """    FROM chats c CROSS JOIN LATERAL (
        SELECT tt.conversation_id, tt.seq, tt.role, tt.content, tt.tokens,
            tt.embedding <=> c.query AS distance
        FROM turns tt
        WHERE c.query IS NOT NULL AND tt.embedding IS NOT NULL AND (
            (tt.conversation_id = c.cid AND tt.seq <= c.top_seq - recent_turns)
            OR (c.scope = 'user' AND c.user_id IS NOT NULL AND tt.conversation_id <> c.cid
                AND tt.conversation_id IN (
                    SELECT cc.id FROM conversations cc
                    WHERE cc.user_id = c.user_id AND cc.tenant_id = c.tenant_id)))
        ORDER BY (tt.embedding <=> c.query) + 0 LIMIT recall_k  -- exact, in scope (0010)
    ) t;"""
BY_SCOPE = """    FROM chats c CROSS JOIN LATERAL (
        SELECT s.* FROM (
            SELECT tt.conversation_id, tt.seq, tt.role, tt.content, tt.tokens,
                tt.embedding <=> c.query AS distance
            FROM turns tt
            WHERE c.query IS NOT NULL AND tt.conversation_id = c.cid
                AND tt.seq <= c.top_seq - recent_turns AND tt.embedding IS NOT NULL
            UNION ALL
            SELECT tt.conversation_id, tt.seq, tt.role, tt.content, tt.tokens,
                tt.embedding <=> c.query AS distance
            FROM conversations cc JOIN turns tt ON tt.conversation_id = cc.id
            WHERE c.query IS NOT NULL AND c.scope = 'user' AND c.user_id IS NOT NULL
                AND cc.user_id = c.user_id AND cc.tenant_id = c.tenant_id AND cc.id <> c.cid
                AND tt.embedding IS NOT NULL
        ) s
        ORDER BY s.distance LIMIT recall_k  -- exact, each scope by its index (0010, 0014)
    ) t;"""


def upgrade() -> None:
    admit_batch.replace(ONE_CONDITION, BY_SCOPE)
    op.drop_index("turns_embedding_hnsw", table_name="turns")


def downgrade() -> None:
    op.execute(
        "CREATE INDEX turns_embedding_hnsw ON turns "
        "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )
    admit_batch.replace(BY_SCOPE, ONE_CONDITION)
