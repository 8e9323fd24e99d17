"""One settings object for every service, read from the environment.

Kontext's own variables carry the ``KONTEXT_`` prefix; the standard
``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` are read as they are. When
either standard variable is unset, ``kontext up`` starts the embedded broker or
database and fills it in.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.topics import Topics


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Configuration shared by the API, the workers and the CLI."""

    model_config = SettingsConfigDict(env_prefix="KONTEXT_", extra="ignore")

    kafka_bootstrap_servers: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS")
    )
    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL"))

    data_dir: Path = Path(".kontext")
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

    context_turns: int = Field(default=20, ge=0)
    """Most recent stored turns considered for a prompt."""
    system_prompt: str = "You are a helpful assistant."

    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=1000, ge=100)

    @field_validator("engines", mode="before")
    @classmethod
    def _split_engines(cls, value: object) -> object:
        return _split_csv(value)

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
