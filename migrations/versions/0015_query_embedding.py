"""The recall query's embedding goes to Postgres in binary and stays there.

The enricher passed each new message's embedding to ``kontext_admit_batch`` as text
(a decimal literal per component) and sent it on in base64 inside the request's
turns, through the inference and completions topics, for the recorder to store with
the user's turn. Now it passes ``vector[]`` (pgvector's binary form), the claim keeps
each job's in ``jobs.query_embedding``, and the recorder's statement stores it with
the turn and clears it: no vector on any topic.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIT_BATCH = """
CREATE FUNCTION kontext_admit_batch(
    job_ids uuid[], queries vector[], recent_turns int, recall_k int, lease interval
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
        SELECT jobs.id, jobs.conversation_id AS cid, jobs.kind, jobs.status, i.query
        FROM unnest(job_ids, queries) WITH ORDINALITY AS i(id, query, ord)
        JOIN jobs ON jobs.id = i.id
        ORDER BY i.ord
    LOOP
        IF j.status = 'needs_review' THEN CONTINUE; END IF; -- held for review (0008)
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
        -- Only a job still open: one finalised since it was read stays so (0011).
        UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = now(),
            query_embedding = j.query
        WHERE jobs.id = j.id AND jobs.status IN ('queued', 'running');
        IF NOT FOUND THEN
            UPDATE conversations c SET in_flight = c.waiting[1], waiting = c.waiting[2:],
                in_flight_since = now()
            WHERE c.id = j.cid AND c.in_flight = j.id;
            CONTINUE;
        END IF;
        admitted := admitted || j.id;
    END LOOP;

    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(job_ids, queries) AS i(id, query)
    ), claimed AS (
        SELECT jobs.id, jobs.conversation_id AS cid, jobs.kind, input.query,
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
    ) t;
END
$fn$
"""

ENRICH = """
CREATE FUNCTION kontext_enrich(
    job_ids uuid[], queries vector[], costs int[], holds bigint[], now_s float8,
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
    op.add_column("jobs", sa.Column("query_embedding", Vector(384)))
    op.execute("DROP FUNCTION kontext_enrich")
    op.execute("DROP FUNCTION kontext_admit_batch")
    op.execute(ADMIT_BATCH)
    op.execute(ENRICH)


def downgrade() -> None:
    text_queries = ADMIT_BATCH.replace("queries vector[]", "queries text[]")
    text_queries = text_queries.replace(
        "jobs.kind, input.query,", "jobs.kind, input.query::vector AS query,"
    )
    text_queries = text_queries.replace(
        ", updated_at = now(),\n            query_embedding = j.query", ", updated_at = now()"
    )
    op.execute("DROP FUNCTION kontext_enrich")
    op.execute("DROP FUNCTION kontext_admit_batch")
    op.execute(text_queries)
    op.execute(ENRICH.replace("queries vector[]", "queries text[]"))
    op.drop_column("jobs", "query_embedding")
