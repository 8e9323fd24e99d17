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
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from schemas.api import FINAL_STATUSES as FINAL_STATUSES
from schemas.usage import NIL_KEY as NIL_KEY

EMBEDDING_DIM = 384
JOB_STATUSES = ("queued", "running", "needs_review", "succeeded", "failed")

metadata = MetaData()


def _tenant() -> Column:  # type: ignore[type-arg]
    """The owning tenant of a row (what a key's requests are scoped to)."""
    return Column(
        "tenant_id", Text, ForeignKey("tenants.id"), nullable=False, server_default="default"
    )


tenants = Table(
    "tenants",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Policy settings, read by the admission policies: NULL is no limit.
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("token_budget", BigInteger),
    Column("cache_opt_out", Boolean, nullable=False, server_default=false()),
)

tenant_budget_spent = Table(
    "tenant_budget_spent",
    metadata,
    # Tokens the tenant's finished jobs used, and the budget its jobs in flight hold
    # (decided by kontext_enrich, settled by the jobs_settle trigger; migration 0013).
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("spent", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("reserved", BigInteger, nullable=False, server_default="0"),
)

tenant_windows = Table(
    "tenant_windows",
    metadata,
    # Requests and tokens counted per second over the last minute (rpm, tpm).
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("second", BigInteger, primary_key=True),
    Column("requests", Integer, nullable=False, server_default="0"),
    Column("tokens", BigInteger, nullable=False, server_default="0"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("prefix", Text, nullable=False, unique=True),  # kx_<8 hex>: shown, names the key
    Column("hash", Text, nullable=False, unique=True),  # hex SHA-256 of the key; never the key
    Column("operator", Boolean, nullable=False, server_default=false()),  # sees every tenant
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True)),
)

usage = Table(
    "usage",
    metadata,
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("key_id", UUID(as_uuid=True), primary_key=True),
    Column("model", Text, primary_key=True),
    Column("period", DateTime(timezone=True), primary_key=True),  # the hour it was answered
    Column("requests", BigInteger, nullable=False, server_default="0"),
    Column("prompt_tokens", BigInteger, nullable=False, server_default="0"),
    Column("completion_tokens", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

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
    Column("idempotency_key", Text),
    _tenant(),
    Column("key_id", UUID(as_uuid=True)),  # the API key that submitted it
    Column("usage_recorded_at", DateTime(timezone=True)),  # counted in ``usage`` (once)
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("completed_at", DateTime(timezone=True)),
    # When its reply was published: a duplicate completion after that replies no more.
    Column("replied_at", DateTime(timezone=True)),
    # A backfill's job: its batch and the custom_id of its input line.
    Column("batch_id", UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE")),
    Column("custom_id", Text),
    # The job's own webhook signing secret: never in ``request``, which travels the topics.
    Column("webhook_secret", Text),
    # What its tenant's limits charged it when it was admitted (decided once): the budget
    # it holds until it turns final, and the second and tokens it counts in the window.
    Column("admitted_at", DateTime(timezone=True)),
    Column("hold", BigInteger),
    Column("window_second", BigInteger),
    Column("window_tokens", Integer),
    # The recall query's embedding, from the enricher's claim until the recorder stores
    # it with the user's turn.
    Column("query_embedding", Vector(EMBEDDING_DIM)),
    # Its timeline (0018): claimed by the enricher, sent on with its prompt, its batch's
    # engine call began and returned (stored by the recorder's statement).
    Column("claimed_at", DateTime(timezone=True)),
    Column("enriched_at", DateTime(timezone=True)),
    Column("batched_at", DateTime(timezone=True)),
    Column("generated_at", DateTime(timezone=True)),
    CheckConstraint(
        "status IN ('queued', 'running', 'needs_review', 'succeeded', 'failed')",
        name="jobs_status_valid",
    ),
    CheckConstraint("kind IN ('chat', 'summary')", name="jobs_kind_valid"),
    UniqueConstraint("tenant_id", "idempotency_key", name="jobs_tenant_idempotency_key"),
    Index("jobs_conversation_created", "conversation_id", "created_at"),
    Index("jobs_status_updated", "status", "updated_at"),
    Index("jobs_batch_status", "batch_id", "status", postgresql_where=text("batch_id IS NOT NULL")),
    Index(
        "jobs_open_summaries",
        "conversation_id",
        postgresql_where=text("kind = 'summary' AND status IN ('queued', 'running')"),
    ),
    # Room on each page for a row's later versions (it is written four times, 0016);
    # rows stay whole in the heap, the claim's embedding too: no TOAST (0022).
    postgresql_with={"fillfactor": 70, "toast_tuple_target": 8160},
)

batches = Table(
    "batches",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("status", Text, nullable=False, server_default="validating"),
    Column("endpoint", Text, nullable=False),
    Column("completion_window", Text, nullable=False),
    Column("idempotency_key", Text),
    _tenant(),
    Column("key_id", UUID(as_uuid=True)),
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
    # Its files (no foreign key: a deleted file leaves the batch as it was, as OpenAI does).
    Column("input_file_id", UUID(as_uuid=True)),
    Column("output_file_id", UUID(as_uuid=True)),  # set when it ends, if a line succeeded
    Column("error_file_id", UUID(as_uuid=True)),  # set when it ends, if a line failed
    CheckConstraint(
        "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', "
        "'expired', 'cancelling', 'cancelled')",
        name="batches_status_valid",
    ),
    UniqueConstraint("tenant_id", "idempotency_key", name="batches_tenant_idempotency_key"),
    Index("batches_status", "status"),
)

files = Table(
    "files",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),  # shown as file-<32 hex>
    _tenant(),
    Column("purpose", Text, nullable=False),  # batch (uploaded) or batch_output (written)
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("purpose IN ('batch', 'batch_output')", name="files_purpose_valid"),
    Index("files_tenant_created", "tenant_id", "created_at"),
)

conversations = Table(
    "conversations",
    metadata,
    Column("id", Text, primary_key=True),  # client-chosen; owned by the tenant that made it
    Column("user_id", Text),
    _tenant(),
    # The order gate: the chat turn in flight, and the turns waiting behind it.
    Column("in_flight", UUID(as_uuid=True)),
    Column("in_flight_since", DateTime(timezone=True)),
    Column("waiting", ARRAY(UUID(as_uuid=True)), nullable=False, server_default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("conversations_user", "user_id"),
    Index("conversations_tenant_user", "tenant_id", "user_id"),
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


webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("url", Text, nullable=False),
    Column("secret", Text, nullable=False),  # whsec_..., shown once at registration
    Column("events", ARRAY(Text), nullable=False),  # e.g. job.completed, batch.*
    Column("description", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("webhook_endpoints_tenant", "tenant_id"),
)


webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column(
        "job_id",
        UUID(as_uuid=True),
        ForeignKey("jobs.id", ondelete="CASCADE"),
    ),
    # A delivery is about one job or one batch (batch.completed and the other batch events).
    Column("batch_id", UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE")),
    # To a tenant's registered endpoint; NULL: to the job's (or batch's) own webhook.
    Column(
        "endpoint_id", UUID(as_uuid=True), ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    ),
    Column("event_type", Text, nullable=False),
    _tenant(),
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
    # The W3C traceparent of its job's ``record`` span, when traced: attempts are its spans.
    Column("traceparent", Text),
    CheckConstraint(
        "status IN ('pending', 'delivered', 'dead')", name="webhook_deliveries_status_valid"
    ),
    CheckConstraint(
        "(job_id IS NULL) <> (batch_id IS NULL)", name="webhook_deliveries_one_subject"
    ),
    Index("webhook_deliveries_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
    Index("webhook_deliveries_status_created", "status", "created_at"),
    # One delivery per subject for its own webhook, and one per subscribed endpoint.
    Index(
        "webhook_deliveries_job_own",
        "job_id",
        unique=True,
        postgresql_where=text("endpoint_id IS NULL"),
    ),
    Index(
        "webhook_deliveries_job_endpoint",
        "job_id",
        "endpoint_id",
        unique=True,
        postgresql_where=text("endpoint_id IS NOT NULL"),
    ),
    Index(
        "webhook_deliveries_batch_own",
        "batch_id",
        unique=True,
        postgresql_where=text("endpoint_id IS NULL"),
    ),
    Index(
        "webhook_deliveries_batch_endpoint",
        "batch_id",
        "endpoint_id",
        unique=True,
        postgresql_where=text("endpoint_id IS NOT NULL"),
    ),
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

response_cache = Table(
    "response_cache",
    metadata,
    # Hex SHA-256 of tenant, model, max_tokens and the assembled prompt.
    Column("key", Text, primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("output", Text, nullable=False),
    Column("finish_reason", Text),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("mean_logprob", Float),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("response_cache_created", "created_at"),
)

REVIEW_STATUSES = ("pending", "approved", "replaced")

reviews = Table(
    "reviews",
    metadata,
    Column(
        "job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("tenant_id", Text, nullable=False),
    Column("conversation_id", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("reasons", ARRAY(Text), nullable=False),
    Column("mean_logprob", Float),
    Column("request", JSONB, nullable=False),  # the turn's new messages
    Column("original_output", Text, nullable=False),
    # The held JobCompletion; once decided, the one delivered.
    Column("completion", JSONB, nullable=False),
    Column("final_output", Text),
    Column("reviewer", Text),
    Column("note", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("decided_at", DateTime(timezone=True)),
    CheckConstraint("status IN ('pending', 'approved', 'replaced')", name="reviews_status_valid"),
    Index("reviews_status_created", "status", "created_at"),
    Index("reviews_tenant_status", "tenant_id", "status"),
)
