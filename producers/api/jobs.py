"""``/v1/jobs``: submit a chat job, read its status and result."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Query, Response

from kontext.store import ledger
from producers.api.auth import Caller, Principal
from producers.api.state import ApiState, state
from producers.api.waiters import RECHECK_S
from producers.submit import submit
from schemas.api import FINAL_STATUSES, ErrorBody, JobAccepted, JobSubmission, JobView
from schemas.events import ChatCompletion, ErrorInfo

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_WAIT_S = 60

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (400, 401, 402, 404, 413, 422, 429, 503)
}


async def submit_as(
    api: ApiState, principal: Principal, submission: JobSubmission
) -> tuple[ledger.JobRow, bool]:
    """Submit for the caller's tenant and key through this process's admitter, producer
    and policy chain (``producers.submit.submit``)."""
    return await submit(
        api.settings,
        api.admitter,
        api.producer,
        submission,
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        chain=api.chain,
    )


@router.post("", status_code=202, response_model=JobAccepted, responses=ERRORS)
async def create_job(
    submission: JobSubmission,
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
) -> Response:
    """Queue a chat job and answer at once; the result comes on the reply topic or by GET.

    A ``conversation_id`` another tenant uses answers 404, as if it did not exist.
    """
    job, created = await submit_as(api, principal, submission)
    accepted = JobAccepted(id=job.id, status=job.status, conversation_id=job.conversation_id)
    # The model serialised once, here (a returned model would be validated again).
    return Response(
        accepted.model_dump_json(),
        status_code=202 if created else 200,
        media_type="application/json",
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


async def read_job(
    api: ApiState, job_id: UUID, tenant_id: str, wait: float
) -> ledger.JobRow | None:
    """The tenant's job, once final or after ``wait`` seconds, whichever comes first."""
    if wait <= 0:
        return await ledger.get(api.pool, job_id, tenant_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    with api.waiters.watch(job_id) as changed:
        while True:
            changed.clear()
            job = await ledger.get(api.pool, job_id, tenant_id)
            left = deadline - loop.time()
            if job is None or job.status in FINAL_STATUSES or left <= 0:
                return job
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(left, RECHECK_S))


@router.get(
    "/{job_id}",
    response_model=JobView,
    responses={401: ERRORS[401], 404: ERRORS[404], 422: ERRORS[422]},
)
async def get_job(
    job_id: UUID,
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for a final status")
    ] = 0,
    timeline: Annotated[
        bool, Query(description="include when the job reached each stage (``timeline``)")
    ] = False,
) -> JobView:
    """The job's status; once succeeded, ``result`` is an OpenAI chat.completion.

    With ``wait``, answers as soon as the job is final, or after ``wait`` seconds
    with whatever status it has then (a long poll). With ``timeline``, ``timeline``
    says when it was accepted, admitted, enriched, batched, generated, recorded,
    replied and delivered (null: not reached).
    """
    job = await read_job(api, job_id, principal.tenant_id, wait)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    stages = await ledger.timeline(api.pool, job.id) if timeline else None
    return JobView(
        id=job.id,
        status=job.status,
        conversation_id=job.conversation_id,
        model=job.model,
        created_at=job.created_at,
        completed_at=job.completed_at,
        result=ChatCompletion.model_validate(job.result) if job.result else None,
        error=ErrorInfo.model_validate(job.error) if job.error else None,
        timeline=stages,
    )
