"""``/v1/usage``: the tenant's token usage per model and per key (an operator may name
any tenant)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from kontext.store import usage
from producers.api.auth import Caller
from producers.api.state import ApiState, state
from schemas.api import ErrorBody
from schemas.usage import KeyUsage, ModelUsage, UsageTotals, UsageView

router = APIRouter(prefix="/v1/usage", tags=["usage"])


def _totals(rows: list[usage.UsageRow]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in rows)
    completion = sum(r.completion_tokens for r in rows)
    return {
        "requests": sum(r.requests for r in rows),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@router.get(
    "",
    response_model=UsageView,
    responses={code: {"model": ErrorBody} for code in (401, 403, 422)},
)
async def get_usage(
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
    tenant: Annotated[str | None, Query(description="another tenant (operator keys only)")] = None,
    since: Annotated[datetime | None, Query(description="from this hour on")] = None,
    until: Annotated[datetime | None, Query(description="before this time")] = None,
) -> UsageView:
    """Tokens in and out and requests, per model and per key, counted from the replies
    (a few hundred milliseconds behind them)."""
    tenant_id = principal.tenant_for(tenant)
    models, keys = await usage.totals(api.pool, tenant_id, since, until)
    return UsageView(
        tenant=tenant_id,
        since=since,
        until=until,
        totals=UsageTotals(**_totals(models)),
        by_model=[ModelUsage(model=r.model or "", **_totals([r])) for r in models],
        by_key=[KeyUsage(key_id=r.key_id, prefix=r.prefix, **_totals([r])) for r in keys],
    )
