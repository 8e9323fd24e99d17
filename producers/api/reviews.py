"""Human review: ``GET /v1/reviews`` lists held results; ``POST /v1/jobs/{id}/review``
approves or replaces one, which then goes on to be recorded and delivered.

A tenant's keys see and decide their own tenant's reviews; operator keys see
and decide every tenant's (``?tenant=`` narrows the list).
"""

from __future__ import annotations

import asyncio
from typing import Annotated
from uuid import UUID

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, HTTPException, Query

from kontext.store import reviews
from producers.api.auth import Caller, Principal
from producers.api.state import ApiState, state
from schemas.api import ErrorBody
from schemas.events import JobCompletion
from schemas.reviews import ReviewDecision, ReviewList, ReviewStatus, ReviewView
from workers import completions
from workers.engines import load_tokenizer
from workers.engines.base import ChatTokenizer
from workers.intake import EnqueueFailed

router = APIRouter(tags=["reviews"])

_tokenizers: dict[str, ChatTokenizer] = {}


def _scope(principal: Principal, tenant: str | None) -> str | None:
    """The tenant whose reviews the caller acts on; None: every tenant's (operators)."""
    if principal.operator and tenant is None:
        return None
    return principal.tenant_for(tenant)


@router.get("/v1/reviews", response_model=ReviewList, responses={422: {"model": ErrorBody}})
async def list_reviews(
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
    status: ReviewStatus | None = "pending",
    tenant: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ReviewList:
    """Held results, oldest first (``status=pending`` by default), with why each was held."""
    found = await reviews.find(
        api.pool, tenant_id=_scope(principal, tenant), status=status, limit=limit
    )
    return ReviewList(data=found)


@router.get(
    "/v1/jobs/{job_id}/review", response_model=ReviewView, responses={404: {"model": ErrorBody}}
)
async def get_review(
    job_id: UUID, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> ReviewView:
    """The review of one held job, pending or decided."""
    found = await reviews.find(
        api.pool, tenant_id=_scope(principal, None), job_id=job_id, status=None, limit=1
    )
    if not found:
        raise HTTPException(404, f"no review for job {job_id}")
    return found[0]


async def _count_tokens(api: ApiState, model: str, text: str) -> int:
    tokenizer = _tokenizers.get(model)
    if tokenizer is None:
        tokenizer = await asyncio.to_thread(load_tokenizer, model, api.settings)
        _tokenizers[model] = tokenizer
    return tokenizer.count(text)


@router.post(
    "/v1/jobs/{job_id}/review",
    response_model=ReviewView,
    responses={code: {"model": ErrorBody} for code in (404, 409, 422, 503)},
)
async def review_job(
    job_id: UUID,
    decision: ReviewDecision,
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
) -> ReviewView:
    """Approve the held answer, or replace it; either way it is then recorded, replied
    to and delivered by webhook once. A decided review answers 409."""

    async def count(model: str, text: str) -> int:
        return await _count_tokens(api, model, text)

    async def deliver(final: JobCompletion) -> None:
        await asyncio.gather(*await completions.publish(api.settings, api.producer, [final]))

    try:
        return await reviews.decide(
            api.pool,
            deliver,
            job_id,
            decision,
            tenant_id=_scope(principal, None),
            reviewer=str(principal.key_id),
            count_tokens=count,
        )
    except reviews.ReviewNotFound:
        raise HTTPException(404, f"no review for job {job_id}") from None
    except reviews.ReviewDecided as exc:
        raise HTTPException(409, str(exc)) from None
    except KafkaError:
        # Nothing was stored: the review is still pending and can be decided again.
        raise EnqueueFailed(f"the review of job {job_id} could not be published") from None
