"""The policy chain: runs each hook of every step in order, over what is still undecided."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from schemas.events import EnrichedRequest, JobCompletion, JobRequest
from workers.policies.base import Policy, Refusal


class PolicyChain:
    """Policy steps composed in order. A job decided by one step is not shown to later ones."""

    def __init__(self, steps: Sequence[Policy]) -> None:
        self.steps = list(steps)

    def rewrite_request(self, request: JobRequest) -> JobRequest:
        for step in self.steps:
            request = step.rewrite_request(request)
        return request

    def rewrite_completion(self, completion: JobCompletion) -> JobCompletion:
        for step in self.steps:
            completion = step.rewrite_completion(completion)
        return completion

    async def check_submit(self, request: JobRequest) -> Refusal | None:
        for step in self.steps:
            refusal = await step.check_submit(request)
            if refusal is not None:
                return refusal
        return None

    async def before_engine(self, items: Sequence[EnrichedRequest]) -> dict[UUID, JobCompletion]:
        answered: dict[UUID, JobCompletion] = {}
        for step in self.steps:
            pending = [i for i in items if i.request.job_id not in answered]
            if not pending:
                break
            answered.update(await step.before_engine(pending))
        return answered

    async def after_engine(
        self, done: Sequence[tuple[EnrichedRequest, JobCompletion]]
    ) -> set[UUID]:
        held: set[UUID] = set()
        for step in self.steps:
            pending = [d for d in done if d[0].request.job_id not in held]
            if not pending:
                break
            held |= await step.after_engine(pending)
        return held

    async def close(self) -> None:
        for step in self.steps:
            await step.close()
