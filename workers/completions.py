"""A job's completion from an engine's answer (or failure), shared by the inference
worker and the policy steps that answer without the engine (the response cache)."""

from __future__ import annotations

from schemas.events import EnrichedRequest, ErrorInfo, JobCompletion, TurnRecord, Usage
from workers.engines.base import Generation


def completion_for(item: EnrichedRequest, output: Generation | ErrorInfo) -> JobCompletion:
    """The completion to publish for ``item``: succeeded with the answer, or failed."""
    request = item.request
    completion = JobCompletion(
        job_id=request.job_id,
        conversation_id=request.conversation_id,
        tenant_id=request.tenant_id,
        model=request.model,
        context=item.context,
        status="failed",
        submitted_at=request.submitted_at,
    )
    if isinstance(output, ErrorInfo):
        return completion.model_copy(update={"error": output})
    usage = Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
    )
    # A model may emit a NUL byte; Postgres text cannot hold one, and the job must be
    # recordable (a completion the recorder cannot store would stall its partition).
    text = output.text.replace("\x00", "")
    answer = TurnRecord(role="assistant", content=text, tokens=output.completion_tokens)
    return completion.model_copy(
        update={
            "status": "succeeded",
            "output": text,
            "finish_reason": output.finish_reason,
            "usage": usage,
            "new_turns": [*item.new_turns, answer],
            "mean_logprob": output.mean_logprob,
        }
    )
