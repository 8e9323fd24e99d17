"""HTTP bodies of human review: held results and reviewer decisions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.api import storable
from schemas.events import ChatMessage

ReviewStatus = Literal["pending", "approved", "replaced"]


class ReviewView(BaseModel):
    """A result held for review, and its decision once taken."""

    job_id: UUID
    tenant_id: str
    conversation_id: str
    model: str
    status: ReviewStatus
    reasons: list[str] = Field(description="why it was held: logprob, request/answer pattern")
    mean_logprob: float | None
    request: list[ChatMessage] = Field(description="the turn's new messages")
    original_output: str = Field(description="the model's answer")
    final_output: str | None = Field(description="the answer delivered, once decided")
    reviewer: str | None = Field(description="the API key id of the reviewer")
    note: str | None
    created_at: datetime
    decided_at: datetime | None


class ReviewList(BaseModel):
    data: list[ReviewView]


class ReviewDecision(BaseModel):
    """``POST /v1/jobs/{id}/review``: deliver the answer as it is, or another one."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["approve", "replace"]
    content: str | None = Field(
        default=None, min_length=1, max_length=100_000, description="the answer, for replace"
    )
    note: str | None = Field(default=None, max_length=10_000, description="the reviewer's note")

    @model_validator(mode="after")
    def _content_with_replace(self) -> ReviewDecision:
        if self.action == "replace" and (self.content is None or not self.content.strip()):
            raise ValueError("action 'replace' needs a non-empty 'content'")
        if self.action == "approve" and self.content is not None:
            raise ValueError("action 'approve' takes no 'content' (use 'replace')")
        storable(self.model_dump(exclude_none=True), "")
        return self
