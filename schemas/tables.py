"""The database schema as SQLAlchemy Core tables (migrations/ creates them).

Hot paths run raw SQL through asyncpg against these same tables; these
definitions are the reference for columns, types and constraints.
"""

from __future__ import annotations

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
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
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

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
    Column("status", Text, nullable=False, server_default="queued"),
    Column("request", JSONB, nullable=False),
    Column("result", JSONB),
    Column("error", JSONB),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("idempotency_key", Text, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("completed_at", DateTime(timezone=True)),
    CheckConstraint(
        "status IN ('queued', 'running', 'succeeded', 'failed')", name="jobs_status_valid"
    ),
    Index("jobs_conversation_created", "conversation_id", "created_at"),
    Index("jobs_status_updated", "status", "updated_at"),
)

conversations = Table(
    "conversations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
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
)
