"""The operator dashboard in a real browser (Debian's Chromium, driven by Playwright):
what it shows matches what the API answers, for operators and for tenants.

With ``KONTEXT_DASHBOARD_SCREENSHOT=PATH`` (``make screenshot``) the batch is larger
and a screenshot of the dashboard under load is written to PATH.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from playwright import async_api as playwright_api

from kontext.store import keys
from producers.backfill import create_batch
from tests.conftest import Stack, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = os.environ.get("KONTEXT_DASHBOARD_SCREENSHOT")
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
async def dashboard_keys(pool: asyncpg.Pool) -> dict[str, str]:
    """An operator key and a key of a tenant with no jobs of its own."""
    operator = await keys.create(pool, "default", operator=True)
    tenant = await keys.create(pool, f"dash-{uuid.uuid4().hex[:8]}")
    return {"operator": operator.key, "tenant": tenant.key, "tenant_id": tenant.tenant_id}


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    """Headless Chromium with a fresh profile; never a downloaded browser."""
    with tempfile.TemporaryDirectory(prefix="kontext-chromium-") as profile:
        async with playwright_api.async_playwright() as driver:
            context = await driver.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1440, "height": 1000},
            )
            try:
                yield context
            finally:
                await context.close()


async def _text(page: Any, selector: str) -> str:
    text: str = await page.locator(selector).first.inner_text(timeout=TIMEOUT_MS)
    return text.strip()


async def _converse(http: httpx.AsyncClient, conversation: str) -> list[dict[str, Any]]:
    jobs = []
    for text in ("My name is Ada and my locker code is 4242.", "I like trains.", "Who am I?"):
        submitted = await http.post(
            "/v1/jobs",
            json={
                "model": "tiny",
                "conversation_id": conversation,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 6,
            },
        )
        assert submitted.status_code == 202, submitted.text
        job = (await http.get(f"/v1/jobs/{submitted.json()['id']}", params={"wait": 60})).json()
        assert job["status"] == "succeeded", job
        jobs.append(job)
    return jobs


def _batch_input(lines: int) -> str:
    return "\n".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": f"Backfill line {i}"}],
                    "max_tokens": 2,
                },
            }
        )
        for i in range(lines)
    )


async def test_dashboard_shows_what_the_api_answers(
    stack: Stack, dashboard_keys: dict[str, str], browser: Any
) -> None:
    operator = {"Authorization": f"Bearer {dashboard_keys['operator']}"}
    async with httpx.AsyncClient(base_url=stack.api_url, headers=operator, timeout=90) as http:
        conversation = f"dash-{uuid.uuid4().hex[:10]}"
        jobs = await _converse(http, conversation)
        # A webhook nobody answers: its delivery fails every attempt and ends dead.
        hooked = await http.post(
            "/v1/jobs",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "Tell nobody."}],
                "max_tokens": 2,
                "webhook": {"url": "http://127.0.0.1:9/nobody-listens"},
            },
        )
        assert hooked.status_code == 202, hooked.text
        created = await create_batch(http, _batch_input(1500 if SCREENSHOT else 6).encode())
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]

        page = await browser.new_page()
        # Narrowed to the jobs' tenant, as the API answers an operator key by default
        # (other tests' tenants may be busy meanwhile).
        await page.goto(
            f"{stack.api_url}/dashboard?tenant=default#key={dashboard_keys['operator']}"
        )
        await page.wait_for_selector("text=operator · tenant default", timeout=TIMEOUT_MS)
        batch = page.locator(f"[data-batch='{batch_id}']")
        await batch.wait_for(timeout=TIMEOUT_MS)
        await page.fill("#conversation-id", conversation)
        await page.click("#open-conversation button")
        await page.click("[data-seq='5']")  # the third user turn
        if SCREENSHOT:
            await _screenshot_under_load(
                page,
                http,
                batch_id,
                Path(SCREENSHOT),
                stack.settings.bootstrap,
                stack.settings.topics.requests,
            )

        # The batch's progress as GET /v1/batches/{id} tells it.
        async def batch_done() -> bool:
            view = (await http.get(f"/v1/batches/{batch_id}")).json()
            return bool(view["status"] == "completed")

        await wait_for(batch_done, timeout=240, interval=0.5)
        counts = (await http.get(f"/v1/batches/{batch_id}")).json()["request_counts"]
        await page.wait_for_selector(
            f"[data-batch='{batch_id}'][data-status='completed']", timeout=TIMEOUT_MS
        )
        for field in ("completed", "failed", "total"):
            shown = await _text(page, f"[data-batch='{batch_id}'] [data-field='{field}']")
            assert int(shown) == counts[field], field
        bar = batch.locator("[role=progressbar]")
        assert await bar.get_attribute("aria-valuenow") == str(
            counts["completed"] + counts["failed"]
        )

        # Job totals and micro-batch totals as the API and /metrics answer them
        # (read again until the page has redrawn with the same figures).
        async def figures_match() -> bool:
            overview = (
                await http.get("/dashboard/api/overview", params={"tenant": "default"})
            ).json()
            shown_jobs = {
                status: await _text(page, f"[data-k='jobs-{status}']")
                for status in ("succeeded", "failed", "queued", "running", "tokens")
            }
            metrics = await http.get("/metrics")
            calls = _metric(metrics.text, "kontext_inference_batch_size_count", 'model="tiny"')
            shown_calls = await _text(page, "[data-model='tiny'] [data-total-calls]")
            deliveries = (await http.get("/v1/webhooks/deliveries", params={"limit": 1000})).json()
            by_status = {
                status: str(sum(d["status"] == status for d in deliveries["data"]))
                for status in ("pending", "delivered", "dead")
            }
            shown_hooks = {
                status: await _text(page, f"[data-k='hooks-{status}']") for status in by_status
            }
            return (
                shown_jobs == {k: str(overview["jobs"][k]) for k in shown_jobs}
                and calls is not None
                and int(shown_calls) == int(calls)
                and shown_hooks == by_status
                and by_status["dead"] != "0"
            )

        await wait_for(figures_match, timeout=30, interval=0.5)
        assert int(await _text(page, "[data-k='jobs-succeeded']")) >= len(jobs) + counts["total"]

        # The conversation viewer: the turns GET /v1/conversations/{id} returns, and what
        # went into the chosen turn's prompt (its job's result.context).
        stored = (await http.get(f"/v1/conversations/{conversation}")).json()
        shown_turns = await page.locator("#conversation [data-seq]").count()
        assert shown_turns == len(stored["turns"]) == 6
        context = jobs[2]["result"]["context"]
        used = await _text(page, "[data-context-for='5'] [data-field='context-turns']")
        assert used == (", ".join(str(seq) for seq in context["turns"]) or "none")
        assert context["turns"], "the third turn's prompt carried earlier turns"
        for seq in context["turns"]:
            assert "in-prompt" in (await page.get_attribute(f"[data-seq='{seq}']", "class") or "")

        # Workers: the inference workers' heartbeats, and every pipeline consumer group.
        for model in ("tiny", "smollm2"):
            await page.wait_for_selector(f"#worker-list [data-model='{model}']", timeout=TIMEOUT_MS)
        for group in ("enricher", "recorder", "inference-tiny", "inference-smollm2"):
            await page.wait_for_selector(
                f"[data-group='{stack.settings.topic_prefix}-{group}']", timeout=TIMEOUT_MS
            )
        await page.close()


async def test_dead_letters_listed_and_redelivered(
    stack: Stack, dashboard_keys: dict[str, str], browser: Any
) -> None:
    topic = stack.settings.topics.requests
    poison = b"\xff\xfenot json " + uuid.uuid4().hex.encode()
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, poison, key=b"dashboard-poison")
    finally:
        await producer.stop()
    source = f"{topic}[{sent.partition}]@{sent.offset}"

    page = await browser.new_page()
    await page.goto(f"{stack.api_url}/dashboard#key={dashboard_keys['operator']}")
    row = page.locator("#dead-letters tr", has_text=source)
    await row.wait_for(timeout=TIMEOUT_MS)
    assert "enricher" in await row.inner_text()
    await row.locator("button").click()
    await row.locator("button", has_text="redelivered").wait_for(timeout=TIMEOUT_MS)
    # The original bytes went back to the requests topic, and the enricher
    # dead-lettered them again: a new letter (the list shows the latest 100), from a
    # later offset of that topic.
    newest = page.locator("#dead-letters tr[data-letter]").first

    async def dead_lettered_again() -> bool:
        text = await newest.inner_text()
        return f"{topic}[{sent.partition}]@" in text and source not in text

    await wait_for(dead_lettered_again, timeout=TIMEOUT_MS / 1000, interval=0.5)
    await page.close()


async def test_tenant_key_sees_only_its_tenant(
    stack: Stack, dashboard_keys: dict[str, str], browser: Any
) -> None:
    tenant = dashboard_keys["tenant_id"]
    page = await browser.new_page()
    await page.goto(f"{stack.api_url}/dashboard#key={dashboard_keys['tenant']}")
    await page.wait_for_selector(f"text=tenant {tenant}", timeout=TIMEOUT_MS)
    await page.wait_for_function("() => Number(document.body.dataset.refreshed) > 0")
    assert await _text(page, "[data-k='jobs-succeeded']") == "0"
    assert await page.locator("[data-batch]").count() == 0
    for panel in ("#latency", "#workers", "#dead-letters", "#batch-sizes"):
        assert not await page.locator(panel).is_visible(), panel
    await page.close()

    # An operator may narrow the page to one tenant.
    page = await browser.new_page()
    await page.goto(f"{stack.api_url}/dashboard?tenant={tenant}#key={dashboard_keys['operator']}")
    await page.wait_for_selector(f"text=operator · tenant {tenant}", timeout=TIMEOUT_MS)
    await page.wait_for_function("() => Number(document.body.dataset.refreshed) > 0")
    assert await _text(page, "[data-k='jobs-succeeded']") == "0"
    assert await page.locator("#workers").is_visible()
    await page.close()

    headers = {"Authorization": f"Bearer {dashboard_keys['tenant']}"}
    async with httpx.AsyncClient(base_url=stack.api_url, headers=headers) as http:
        overview = (await http.get("/dashboard/api/overview")).json()
        assert overview["scope"] == {"tenant": tenant, "operator": False}
        assert "workers" not in overview and "dead_letters" not in overview
        refused = await http.post("/dashboard/api/dead-letters/0/0/redeliver")
        assert refused.status_code == 403
        other = await http.get("/dashboard/api/overview", params={"tenant": "default"})
        assert other.status_code == 403
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        assert (await http.get("/dashboard/api/overview")).status_code == 401
        assert (await http.get("/dashboard")).status_code == 200  # the shell holds no data


def _metric(text: str, name: str, label: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return None


async def _screenshot_under_load(
    page: Any,
    http: httpx.AsyncClient,
    batch_id: str,
    path: Path,
    bootstrap: str,
    requests_topic: str,
) -> None:
    """Save the page once the dashboard shows the batch partly done, with interactive
    turns running beside it."""
    conversations = [f"load-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for conversation in conversations:
        await http.post(
            "/v1/jobs",
            json={
                "model": "tiny",
                "conversation_id": conversation,
                "messages": [{"role": "user", "content": "Hello while the backfill runs"}],
                "max_tokens": 4,
            },
        )

    # Show a dead letter too: one message that does not parse.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(requests_topic, b"{not json", key=b"screenshot")
    finally:
        await producer.stop()
    await page.wait_for_function(
        """id => {
            const batch = document.querySelector(`[data-batch='${id}']`);
            if (!batch || Number(document.body.dataset.refreshed) < 4) return false;
            const done = Number(batch.querySelector("[data-field=completed]").textContent);
            const total = Number(batch.querySelector("[data-field=total]").textContent);
            return done >= total * 0.25 && done < total
                && document.querySelector("#dead-letters tr[data-letter]") !== null;
        }""",
        arg=batch_id,
        timeout=120_000,
        polling=250,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(path), full_page=True)
