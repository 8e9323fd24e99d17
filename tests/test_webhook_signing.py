"""Signatures verify under the reference Standard Webhooks library; the retry schedule."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from kontext.settings import Settings
from schemas.events import WebhookTarget
from tests.conftest import WEBHOOK_SECRETS
from workers import signing
from workers.retries import RetryPolicy

BODY = b'{"type":"job.completed","data":{"id":"x"}}'


def test_signature_verifies_with_the_reference_library() -> None:
    now = int(time.time())
    headers = signing.headers(WEBHOOK_SECRETS[:1], "msg_1", now, BODY)
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == str(now)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(WEBHOOK_SECRETS[0]).verify(BODY, headers) == {
        "type": "job.completed",
        "data": {"id": "x"},
    }
    expected = Webhook(WEBHOOK_SECRETS[0]).sign(
        "msg_1", datetime.fromtimestamp(now, UTC), BODY.decode()
    )
    assert headers["webhook-signature"] == expected


def test_rotation_signs_with_every_secret() -> None:
    headers = signing.headers(WEBHOOK_SECRETS, "msg_2", int(time.time()), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in WEBHOOK_SECRETS:
        Webhook(secret).verify(BODY, headers)


def test_tampering_fails_verification() -> None:
    headers = signing.headers(WEBHOOK_SECRETS, "msg_3", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRETS[0]).verify(BODY.replace(b"x", b"y"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRETS[0]).verify(BODY, {**headers, "webhook-id": "msg_other"})


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ("a29udGV4dC10ZXN0LXdlYmhvb2stc2VjcmV0LW9sZCE=", "whsec_"),
        ("whsec_not base64!", "base64"),
        ("whsec_c2hvcnQ=", "24 to 64 bytes"),
    ],
)
def test_bad_secrets_are_refused_without_echoing_them(secret: str, reason: str) -> None:
    with pytest.raises(ValidationError) as refused:
        WebhookTarget(url="https://example.com/", secret=secret)
    assert reason in str(refused.value)
    assert secret not in str(refused.value)
    with pytest.raises(ValidationError) as refused:
        Settings(webhook_secret=[secret])
    assert secret not in str(refused.value)


def test_secret_is_not_in_repr() -> None:
    target = WebhookTarget(url="https://example.com/", secret=WEBHOOK_SECRETS[0])
    assert WEBHOOK_SECRETS[0] not in repr(target)
    assert WEBHOOK_SECRETS[0] not in repr(Settings(webhook_secret=list(WEBHOOK_SECRETS)))


def test_retry_schedule_with_jitter_and_limit() -> None:
    policy = RetryPolicy([0, 5, 300], jitter=0.2)
    assert policy.first_delay == 0
    assert policy.max_attempts == 3
    for _ in range(50):
        after_first = policy.delay_after(1)
        assert after_first is not None and 4.0 <= after_first <= 6.0
    assert policy.delay_after(3) is None
    longer = RetryPolicy([0, 1], max_attempts=4)
    assert [longer.delay_after(n) for n in (1, 2, 3, 4)] == [1, 1, 1, None]
    assert RetryPolicy([0, 1, 2, 3], max_attempts=2).delay_after(2) is None


def test_schedule_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KONTEXT_WEBHOOK_RETRY_SCHEDULE_S", "0, 0.2,0.2")
    assert Settings().webhook_retry_schedule_s == [0, 0.2, 0.2]
    monkeypatch.setenv("KONTEXT_WEBHOOK_RETRY_SCHEDULE_S", "0,-1")
    with pytest.raises(ValidationError, match="negative"):
        Settings()
