"""``GET /v1/usage``: a tenant's token usage per model and per API key."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, Field

NIL_KEY = "00000000-0000-0000-0000-000000000000"
"""``usage.key_id`` of work no API key submitted (memory summaries)."""


class UsageTotals(BaseModel):
    requests: int = Field(description="final jobs (succeeded or failed)")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelUsage(UsageTotals):
    model: str


class KeyUsage(UsageTotals):
    key_id: UUID | None = Field(description="None: work no key submitted (memory summaries)")
    prefix: str | None = Field(description="the key's shown prefix (kx_...)")


class UsageView(BaseModel):
    object: str = "usage"
    tenant: str
    since: datetime | None = None
    until: datetime | None = None
    totals: UsageTotals
    by_model: list[ModelUsage]
    by_key: list[KeyUsage]
