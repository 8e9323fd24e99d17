"""``/v1/webhooks/deliveries``: list webhook deliveries with their attempts; redeliver."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Query

from kontext.store import deliveries
from kontext.store.deliveries import Redelivery
from producers.api.auth import Caller
from producers.api.state import ApiState, state
from schemas.api import ErrorBody
from schemas.webhooks import DeliveryList, DeliveryStatus, DeliveryView

router = APIRouter(prefix="/v1/webhooks/deliveries", tags=["webhooks"])


@router.get("", response_model=DeliveryList, responses={422: {"model": ErrorBody}})
async def list_deliveries(
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
    status: DeliveryStatus | None = None,
    job_id: UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DeliveryList:
    """The tenant's deliveries, newest first, each with every attempt (status code,
    latency, error)."""
    found = await deliveries.find(
        api.pool, status=status, job_id=job_id, tenant_id=principal.tenant_id, limit=limit
    )
    return DeliveryList(data=found)


async def _one(api: ApiState, delivery_id: UUID, tenant_id: str) -> DeliveryView:
    found = await deliveries.find(api.pool, delivery_id=delivery_id, tenant_id=tenant_id, limit=1)
    if not found:
        raise HTTPException(404, f"no webhook delivery {delivery_id}")
    return found[0]


@router.get("/{delivery_id}", response_model=DeliveryView, responses={404: {"model": ErrorBody}})
async def get_delivery(
    delivery_id: UUID, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> DeliveryView:
    """One delivery with its attempts."""
    return await _one(api, delivery_id, principal.tenant_id)


@router.post(
    "/{delivery_id}/redeliver",
    status_code=202,
    response_model=DeliveryView,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
async def redeliver(
    delivery_id: UUID, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> DeliveryView:
    """Queue the delivery for an attempt now, with a fresh retry schedule (even when dead)."""
    outcome = await deliveries.redeliver(api.pool, delivery_id, principal.tenant_id)
    if outcome is Redelivery.MISSING:
        raise HTTPException(404, f"no webhook delivery {delivery_id}")
    if outcome is Redelivery.IN_FLIGHT:
        raise HTTPException(409, f"an attempt of delivery {delivery_id} is in flight; retry soon")
    return await _one(api, delivery_id, principal.tenant_id)
