"""``/v1/jobs``: submit a chat job, read its status and result."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Response

from kontext import ledger
from producers.api.state import ApiState, state
from producers.submit import submit
from schemas.api import ErrorBody, JobAccepted, JobSubmission, JobView
from schemas.events import ChatCompletion, ErrorInfo

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (400, 413, 422, 503)
}


@router.post("", status_code=202, response_model=JobAccepted, responses=ERRORS)
async def create_job(
    submission: JobSubmission, response: Response, api: Annotated[ApiState, Depends(state)]
) -> JobAccepted:
    """Queue a chat job and answer at once; the result comes on the reply topic or by GET."""
    job, created = await submit(api.settings, api.pool, api.producer, submission)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return JobAccepted(id=job.id, status=job.status, conversation_id=job.conversation_id)


@router.get("/{job_id}", response_model=JobView, responses={404: {"model": ErrorBody}})
async def get_job(job_id: UUID, api: Annotated[ApiState, Depends(state)]) -> JobView:
    """The job's status; once succeeded, ``result`` is an OpenAI chat.completion."""
    job = await ledger.get(api.pool, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return JobView(
        id=job.id,
        status=job.status,
        conversation_id=job.conversation_id,
        model=job.model,
        created_at=job.created_at,
        completed_at=job.completed_at,
        result=ChatCompletion.model_validate(job.result) if job.result else None,
        error=ErrorInfo.model_validate(job.error) if job.error else None,
    )
