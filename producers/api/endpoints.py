"""``/v1/webhooks/endpoints``: a tenant's own webhook endpoints, for all its jobs and batches."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Response

from kontext.store import endpoints
from producers.api.auth import Caller
from producers.api.state import ApiState, state
from producers.submit import check_webhook
from schemas.api import ErrorBody
from schemas.events import WebhookTarget
from schemas.webhooks import EndpointCreate, EndpointList, EndpointView

router = APIRouter(prefix="/v1/webhooks/endpoints", tags=["webhooks"])


@router.post(
    "",
    status_code=201,
    response_model=EndpointView,
    responses={422: {"model": ErrorBody}},
)
async def create_endpoint(
    body: EndpointCreate, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> EndpointView:
    """Register an endpoint: every subscribed event of the tenant's chat jobs (not each
    batch line) and batches is delivered to it, signed with its own secret, which this
    answer shows once."""
    # Its own secret signs its deliveries: only the URL needs checking (SSRF guard).
    await check_webhook(api.settings, WebhookTarget(url=body.url, secret=endpoints.new_secret()))
    return await endpoints.register(
        api.pool, principal.tenant_id, body.url, body.events, body.description
    )


@router.get("", response_model=EndpointList)
async def list_endpoints(
    api: Annotated[ApiState, Depends(state)], principal: Caller
) -> EndpointList:
    """The tenant's endpoints (without their secrets)."""
    return EndpointList(data=await endpoints.find(api.pool, principal.tenant_id))


@router.delete("/{endpoint_id}", status_code=204, responses={404: {"model": ErrorBody}})
async def delete_endpoint(
    endpoint_id: UUID, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> Response:
    """Remove an endpoint; deliveries to it that are still pending are dropped."""
    if not await endpoints.remove(api.pool, principal.tenant_id, endpoint_id):
        raise HTTPException(404, f"no webhook endpoint {endpoint_id}")
    return Response(status_code=204)
