"""The SSRF guard: which webhook URLs are refused, and what the allow-list admits."""

from __future__ import annotations

import pytest

from kontext.settings import Settings
from kontext.ssrf import UrlGuard, UrlRefused
from producers.submit import SubmissionRejected, check_webhook
from schemas.events import WebhookTarget

REFUSED = [
    # (url, text in the reason)
    ("http://10.0.0.1/hook", "private"),
    ("http://10.255.3.7:8080/hook", "private"),
    ("http://172.16.4.2/", "private"),
    ("http://192.168.1.10:8080/x", "private"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://169.254.10.1/", "link-local"),
    ("http://127.0.0.1:9000/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://localhost/hook", "loopback"),
    ("http://LOCALHOST./hook", "loopback"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://100.64.0.1/", "not a globally routable"),
    ("file:///etc/passwd", "http or https"),
    ("ftp://93.184.215.14/", "http or https"),
    ("gopher://93.184.215.14/", "http or https"),
    ("http://user:secret@93.184.215.14/", "credentials"),
    ("http:///no-host", "no host"),
    ("http://93.184.215.14:99999/", "malformed"),
    ("http://no-such-host.invalid/", "does not resolve"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
async def test_refused_urls(url: str, reason: str) -> None:
    with pytest.raises(UrlRefused, match=reason):
        await UrlGuard().check(url)


@pytest.mark.parametrize(
    "url",
    ["http://93.184.215.14/hook", "https://93.184.215.14:8443/h?x=1", "https://[2606:4700::1111]/"],
)
async def test_public_addresses_pass(url: str) -> None:
    await UrlGuard().check(url)


@pytest.mark.parametrize(
    ("allow", "url"),
    [
        (["localhost"], "http://localhost:8080/hook"),
        (["LocalHost"], "http://localhost/hook"),
        (["127.0.0.1"], "http://127.0.0.1:9/hook"),
        (["10.0.0.0/8"], "http://10.1.2.3/hook"),
        (["192.168.0.0/16", "fd00::/8"], "http://[fd12::1]/hook"),
    ],
)
async def test_allow_list_admits_hosts_and_cidrs(allow: list[str], url: str) -> None:
    await UrlGuard(allow).check(url)


@pytest.mark.parametrize(
    ("allow", "url"),
    [
        (["10.0.0.0/8"], "http://192.168.0.1/"),
        (["127.0.0.1"], "http://[::1]/"),
        (["example.com"], "http://10.0.0.1/"),
        (["localhost"], "file:///etc/passwd"),
    ],
)
async def test_allow_list_admits_nothing_else(allow: list[str], url: str) -> None:
    with pytest.raises(UrlRefused):
        await UrlGuard(allow).check(url)


async def test_submission_needs_a_secret_when_the_deployment_has_none() -> None:
    settings = Settings(webhook_secret=[], webhook_allow_hosts=[])
    with pytest.raises(SubmissionRejected) as refused:
        await check_webhook(settings, WebhookTarget(url="https://93.184.215.14/hook"))
    assert refused.value.code == "webhook_secret_required"
    assert "KONTEXT_WEBHOOK_SECRET" in refused.value.message
