"""The database schema as SQLAlchemy Core tables (migrations/ creates them).

Hot paths run raw SQL through asyncpg against these same tables; these
definitions are the reference for columns, types and constraints.
"""

from __future__ import annotations

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

EMBEDDING_DIM = 384
JOB_STATUSES = ("queued", "running", "succeeded", "failed")
FINAL_STATUSES = ("succeeded", "failed")

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("conversation_id", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("kind", Text, nullable=False, server_default="chat"),
    Column("status", Text, nullable=False, server_default="queued"),
    Column("request", JSONB, nullable=False),
    Column("result", JSONB),
    Column("error", JSONB),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("idempotency_key", Text, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("completed_at", DateTime(timezone=True)),
    # When its reply was published: a duplicate completion after that replies no more.
    Column("replied_at", DateTime(timezone=True)),
    # A backfill's job: its batch and the custom_id of its input line.
    Column("batch_id", UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE")),
    Column("custom_id", Text),
    CheckConstraint(
        "status IN ('queued', 'running', 'succeeded', 'failed')", name="jobs_status_valid"
    ),
    CheckConstraint("kind IN ('chat', 'summary')", name="jobs_kind_valid"),
    Index("jobs_conversation_created", "conversation_id", "created_at"),
    Index("jobs_status_updated", "status", "updated_at"),
    Index("jobs_batch_status", "batch_id", "status", postgresql_where=text("batch_id IS NOT NULL")),
)

batches = Table(
    "batches",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("status", Text, nullable=False, server_default="validating"),
    Column("endpoint", Text, nullable=False),
    Column("completion_window", Text, nullable=False),
    Column("idempotency_key", Text, unique=True),
    Column("input_sha256", Text, nullable=False),
    Column("metadata", JSONB, nullable=False, server_default="{}"),
    Column("webhook", JSONB),  # {"url", "secret"?}: where the batch's end event goes
    Column("total", Integer, nullable=False),  # every input line, good or bad
    Column("completed", Integer, nullable=False, server_default="0"),  # succeeded jobs
    Column("failed", Integer, nullable=False, server_default="0"),  # failed jobs
    Column("errors", JSONB, nullable=False, server_default="[]"),  # the bad input lines
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("in_progress_at", DateTime(timezone=True)),
    Column("finalizing_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
    Column("failed_at", DateTime(timezone=True)),
    Column("expired_at", DateTime(timezone=True)),
    Column("cancelling_at", DateTime(timezone=True)),
    Column("cancelled_at", DateTime(timezone=True)),
    Column("notified_at", DateTime(timezone=True)),  # its webhook delivery was created
    CheckConstraint(
        "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', "
        "'expired', 'cancelling', 'cancelled')",
        name="batches_status_valid",
    ),
    Index("batches_status", "status"),
)

conversations = Table(
    "conversations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("user_id", Text),
    # The order gate: the chat turn in flight, and the turns waiting behind it.
    Column("in_flight", UUID(as_uuid=True)),
    Column("in_flight_since", DateTime(timezone=True)),
    Column("waiting", ARRAY(UUID(as_uuid=True)), nullable=False, server_default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("conversations_user", "user_id"),
)

turns = Table(
    "turns",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "conversation_id",
        Text,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("seq", Integer, nullable=False),
    Column("role", Text, nullable=False),
    Column("content", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("job_id", UUID(as_uuid=True)),
    Column("embedding", Vector(EMBEDDING_DIM)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("conversation_id", "seq", name="turns_conversation_seq"),
    CheckConstraint("role IN ('system', 'user', 'assistant')", name="turns_role_valid"),
    Index(
        "turns_embedding_hnsw",
        "embedding",
        postgresql_using="hnsw",
        postgresql_with={"m": 16, "ef_construction": 64},
        postgresql_ops={"embedding": "vector_cosine_ops"},
    ),
    Index(
        "turns_unembedded",
        "conversation_id",
        "seq",
        postgresql_where=text("embedding IS NULL"),
    ),
)

summaries = Table(
    "summaries",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "conversation_id",
        Text,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("level", Integer, nullable=False),
    Column("first_seq", Integer, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("content", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("rolled_up", Boolean, nullable=False, server_default=false()),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint(
        "conversation_id", "level", "first_seq", name="summaries_conversation_level_first"
    ),
)


webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column(
        "job_id",
        UUID(as_uuid=True),
        ForeignKey("jobs.id", ondelete="CASCADE"),
        unique=True,
    ),
    # A delivery is about one job or one batch (batch.completed and the other batch events).
    Column(
        "batch_id", UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE"), unique=True
    ),
    Column("event_type", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("secret", Text),  # the job's own whsec_ secret; NULL: the deployment's
    Column("payload", JSONB, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # Attempts since creation or the last redelivery, counted against the retry schedule.
    Column("cycle_attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("leased_until", DateTime(timezone=True)),  # an attempt is in flight until then
    Column("last_status_code", Integer),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True)),
    CheckConstraint(
        "status IN ('pending', 'delivered', 'dead')", name="webhook_deliveries_status_valid"
    ),
    CheckConstraint(
        "(job_id IS NULL) <> (batch_id IS NULL)", name="webhook_deliveries_one_subject"
    ),
    Index("webhook_deliveries_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
    Index("webhook_deliveries_status_created", "status", "created_at"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "delivery_id",
        UUID(as_uuid=True),
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("attempt", Integer, nullable=False),
    Column("status_code", Integer),
    Column("latency_ms", Integer, nullable=False),
    Column("error", Text),
    Column("attempted_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("delivery_id", "attempt", name="webhook_attempts_delivery_attempt"),
)
