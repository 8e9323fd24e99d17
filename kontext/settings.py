"""One settings object for every service, read from the environment.

Kontext's own variables carry the ``KONTEXT_`` prefix; the standard
``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` are read as they are. When
either standard variable is unset, ``kontext up`` starts the embedded broker or
database and fills it in.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.events import WebhookSecret
from schemas.topics import Topics


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Configuration shared by the API, the workers and the CLI."""

    model_config = SettingsConfigDict(
        env_prefix="KONTEXT_", extra="ignore", hide_input_in_errors=True
    )

    kafka_bootstrap_servers: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS")
    )
    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL"))

    data_dir: Path = Path(".kontext")
    health_file: Path | None = None
    """A running process touches this file every 5 s while all its services are ready
    (``kontext health`` checks it; container healthchecks use it)."""
    """Embedded broker/database state (dev runtime only)."""
    model_cache_dir: Path = Path.home() / ".cache" / "kontext" / "models"
    """Converted model weights, written once and reused."""

    engines: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["smollm2"])
    """Models served by this deployment: one inference worker each; requests name one."""

    topic_prefix: str = "kontext"
    topic_partitions: int = Field(default=4, ge=1)
    topic_replication: int = Field(default=1, ge=1)

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_messages: int = Field(default=256, ge=1)
    max_tokens_limit: int = Field(default=1024, ge=1)
    default_max_tokens: int = Field(default=64, ge=1)

    batch_max_size: int = Field(default=16, ge=1)
    batch_max_wait_ms: int = Field(default=20, ge=0)
    background_share: float = Field(default=0.25, gt=0, le=1)
    """Share of each inference micro-batch kept for background work (summaries, backfills)."""

    context_turns: int = Field(default=20, ge=0)
    """Most recent stored turns considered for a prompt."""
    context_budget_tokens: int | None = Field(default=None, ge=64)
    """Lower every model's prompt budget to this many tokens (default: the model's window)."""
    recall_k: int = Field(default=4, ge=0)
    """Older turns recalled by similarity to the new message."""
    system_prompt: str | None = None
    """Default system prompt for every model (default: each model's own)."""
    summarizer: Literal["model", "extractive"] = "model"
    """``model``: summaries are jobs the model writes; ``extractive``: deterministic, no model."""
    summary_model: str | None = None
    """Model that writes summaries (default: the first served engine)."""
    summary_trigger_tokens: int = Field(default=768, ge=32)
    """Unsummarised tokens (outside the recent turns) that start a level-1 summary."""
    summary_rollup_tokens: int = Field(default=768, ge=32)
    """Tokens of level-N summaries that roll them up into one level N+1 summary."""
    summary_keep_recent: int = Field(default=6, ge=0)
    """Most recent turns never summarised (they go into prompts whole)."""
    summary_max_tokens: int = Field(default=128, ge=8)
    job_lease_s: float = Field(default=120.0, gt=0)
    """A job queued or running longer than this is published again by the reconciler."""
    reconcile_interval_s: float = Field(default=10.0, gt=0)
    ordering_lease_s: float = Field(default=300.0, gt=0)
    """A conversation's turn in flight longer than this no longer holds back the next."""

    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=1000, ge=100)
    kafka_fetch_max_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Most bytes one fetch brings back: with the batch in hand and the next one, what a
    consumer holds of a backlog (the rest stays on the broker)."""
    kafka_fetch_max_wait_ms: int = Field(default=50, ge=1, le=10_000)
    """Longest a consumer's fetch waits on the broker when no data is ready: each hop's
    worst added latency, traded against idle polling CPU (about 13% of a core at 25 ms,
    5% at 500 ms for `kontext up`)."""

    webhook_secret: Annotated[list[WebhookSecret], NoDecode] = Field(
        default_factory=list, repr=False
    )
    """Deployment signing secrets (whsec_..., comma-separated: each one signs, for rotation)."""
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Host names and CIDRs the SSRF guard admits even when private or loopback."""
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.0, 5, 300, 1800, 7200, 18000, 36000, 36000], min_length=1
    )
    """Delay before each attempt, in seconds (the first is the delay before the first)."""
    webhook_max_attempts: int | None = Field(default=None, ge=1)
    """Attempts before a delivery is dead; default one per schedule entry (the last repeats)."""
    webhook_retry_jitter: float = Field(default=0.2, ge=0, le=1)
    """Each retry delay is scaled by a random factor in [1 - jitter, 1 + jitter]."""
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_poll_interval_s: float = Field(default=0.5, gt=0)
    """How often the dispatcher looks for due retries."""
    webhook_claim_batch: int = Field(default=64, ge=1)
    webhook_max_connections: int = Field(default=100, ge=1)

    backfill_max_bytes: int = Field(default=100_000_000, ge=1024)
    """Largest ``POST /v1/batches`` body (other requests keep ``max_body_bytes``)."""
    backfill_max_lines: int = Field(default=50_000, ge=1)
    backfill_chunk_size: int = Field(default=500, ge=1)
    """Batch lines admitted per ledger insert (one statement) and per pipelined publish."""
    backfill_sweep_interval_s: float = Field(default=1.0, gt=0)
    """How often the batches service recounts open batches and expires overdue ones."""

    @field_validator("engines", mode="before")
    @classmethod
    def _split_engines(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator(
        "webhook_secret", "webhook_allow_hosts", "webhook_retry_schedule_s", mode="before"
    )
    @classmethod
    def _split_webhook_lists(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _non_negative_delays(cls, value: list[float]) -> list[float]:
        if any(delay < 0 for delay in value):
            raise ValueError("retry delays must not be negative")
        return value

    @cached_property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)

    @property
    def bootstrap(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise RuntimeError("KAFKA_BOOTSTRAP_SERVERS is not set (kontext up starts a broker)")
        return self.kafka_bootstrap_servers

    @property
    def dsn(self) -> str:
        """The database URL in asyncpg's form (no SQLAlchemy driver suffix)."""
        if not self.database_url:
            raise RuntimeError("DATABASE_URL is not set (kontext up starts a database)")
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
