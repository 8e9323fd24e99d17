"""PII redaction step: e-mail addresses, phone numbers and card numbers never stored.

At intake the new messages of a job are redacted before it is recorded or
published, so neither the ledger, the topics, the conversation's memory nor the
model sees them; after the engine the answer is redacted before any later step
(review, cache) or the recorder sees it. Off unless ``KONTEXT_REDACT_PII``.
"""

from __future__ import annotations

from kontext.redaction import Redactor
from schemas.events import ChatMessage, JobCompletion, JobRequest
from workers.policies.base import Policy


class PiiRedaction(Policy):
    name = "pii-redaction"

    def __init__(self, region: str) -> None:
        self.redact = Redactor(region)

    def rewrite_request(self, request: JobRequest) -> JobRequest:
        messages = [
            ChatMessage(role=m.role, content=self.redact(m.content)) for m in request.messages
        ]
        return request.model_copy(update={"messages": messages})

    def rewrite_completion(self, completion: JobCompletion) -> JobCompletion:
        if completion.output is None:
            return completion
        output = self.redact(completion.output)
        turns = [
            t.model_copy(update={"content": output}) if t.role == "assistant" else t
            for t in completion.new_turns
        ]
        return completion.model_copy(update={"output": output, "new_turns": turns})
