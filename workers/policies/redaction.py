"""PII redaction step: e-mail addresses, phone numbers and card numbers never stored.

At intake the new messages of a job are redacted before it is recorded or
published, so neither the ledger, the topics, the conversation's memory nor the
model sees them; after the engine the answer is redacted before any later step
(review, cache) or the recorder sees it. Off unless ``KONTEXT_REDACT_PII``.

Card numbers are 13-19 digits (spaces or dashes between groups allowed) that
pass the Luhn check, so order numbers and dates are left alone. Phone numbers
are found by libphonenumber's matcher (the ``phonenumbers`` package): numbers
written with a ``+`` country code anywhere, national numbers in the configured
region. Each match becomes a marker that the model and a reader understand:
``[EMAIL]``, ``[CARD]``, ``[PHONE]``.
"""

from __future__ import annotations

import re

import phonenumbers

from schemas.events import ChatMessage, JobCompletion, JobRequest
from workers.policies.base import Policy

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")


def luhn_valid(digits: str) -> bool:
    """True if ``digits`` passes the Luhn checksum of payment card numbers."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if luhn_valid(digits) else match.group()


class Redactor:
    """Redacts PII from text; ``region`` (ISO 3166 code) reads national phone numbers."""

    def __init__(self, region: str = "US") -> None:
        self.region = region

    def __call__(self, text: str) -> str:
        text = EMAIL.sub("[EMAIL]", text)
        text = CARD.sub(_card, text)
        found = phonenumbers.PhoneNumberMatcher(
            text, self.region, leniency=phonenumbers.Leniency.POSSIBLE
        )
        parts: list[str] = []
        end = 0
        for match in found:
            parts += [text[end : match.start], "[PHONE]"]
            end = match.end
        return "".join(parts) + text[end:] if parts else text


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
