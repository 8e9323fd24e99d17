"""``kontext bench-policies``: what the full policy chain costs per request.

Same workload, null engine (no model: only the pipeline's own cost), chain off,
limits only, then on, alternating for ``rounds`` rounds on one embedded broker
and database:

- off: ``KONTEXT_POLICY_LIMITS=false`` (no limits), no response cache, no review
  step;
- limits: tenant limits alone (rpm, tpm and budget set, far above the load, so
  every check runs in the enricher's statement and none refuses, and every job
  settles);
- on: every step: limits as above, human review with a pattern that never
  matches, and the response cache (every prompt distinct, so every lookup misses
  and every answer is written).

Each request is submitted over HTTP and awaited with the long poll; its latency
is submission to final status. A micro-benchmark also times the limits step's
API hook in-process (``check_submit``).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from kontext.app.runtime import Runtime, run_while
from kontext.bench import memory as bench
from kontext.settings import Settings
from kontext.store.keys import mint
from schemas.events import ChatMessage, JobRequest
from schemas.limits import TenantLimitStatus
from workers.policies.compose import ChainParts, build_chain

WARM_UP = 20


@dataclass(frozen=True)
class Run:
    chain: str
    requests: int
    elapsed_s: float
    latencies_ms: list[float]

    def row(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        return {
            "chain": self.chain,
            "requests": self.requests,
            "requests_per_s": round(self.requests / self.elapsed_s, 1),
            "mean_ms": round(statistics.fmean(ordered), 1),
            "p50_ms": round(ordered[len(ordered) // 2], 1),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 1),
        }


VARIANTS = ("off", "limits", "on")
"""off: no step; limits: tenant limits alone; on: the full chain."""


def chain_settings(base: Settings, variant: str) -> Settings:
    update: dict[str, Any] = {
        "topic_prefix": f"bp{uuid.uuid4().hex[:8]}",
        "policy_limits": False,
        "cache_ttl_s": 0.0,
        "review_patterns": [],
        "review_logprob_threshold": None,
    }
    if variant in ("limits", "on"):
        update.update(
            policy_limits=True,
            default_rpm=1_000_000_000,
            default_tpm=1_000_000_000_000,
            default_token_budget=1_000_000_000_000_000,
        )
    if variant == "on":
        # The review pattern never matches: the step runs and holds nothing.
        update.update(cache_ttl_s=3600.0, review_patterns=[r"(?!)"])
    return base.model_copy(update=update)


async def _load(url: str, key: str, requests: int, concurrency: int, tag: str) -> Run:
    latencies: list[float] = []
    counter = iter(range(requests))
    headers = {"Authorization": f"Bearer {key}"}

    async def one(http: httpx.AsyncClient, n: int) -> float:
        body = {
            "model": "null",
            "messages": [{"role": "user", "content": f"request {tag}-{n}: how are you?"}],
            "max_tokens": 8,
        }
        started = time.perf_counter()
        response = await http.post("/v1/jobs", json=body)
        response.raise_for_status()
        job_id = response.json()["id"]
        while True:
            job = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
            if job["status"] == "succeeded":
                return (time.perf_counter() - started) * 1000
            if job["status"] == "failed":
                raise RuntimeError(f"job {job_id} failed: {job['error']}")

    async def worker(http: httpx.AsyncClient) -> None:
        for n in counter:
            latencies.append(await one(http, n))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        for n in range(WARM_UP):
            await one(http, -n - 1)
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Run(tag, requests, elapsed, latencies)


async def end_to_end(settings: Settings, requests: int, concurrency: int, tag: str) -> Run:
    """One run of the workload against a fresh runtime with these settings."""
    key = await mint(settings.dsn)

    async def work(runtime: Runtime, url: str) -> Run:
        return await _load(url, key, requests, concurrency, tag)

    return await run_while(settings, work, asyncio.Event())


async def hooks(samples: int = 20_000) -> dict[str, float]:
    """Microseconds per request of the limits step's API hook, in-process."""
    settings = Settings(
        default_rpm=1_000_000_000,
        default_tpm=1_000_000_000_000,
        default_token_budget=1_000_000_000_000_000,
        cache_ttl_s=0,
    )

    class View:
        def status(self, tenant_id: str) -> TenantLimitStatus | None:
            return TenantLimitStatus(tenant_id=tenant_id, budget=10**15, budget_spent=10)

    api = build_chain(settings, ChainParts(limit_view=View()))
    requests = [
        JobRequest(
            job_id=uuid.uuid4(),
            conversation_id="c",
            tenant_id=f"tenant-{n % 8}",
            model="null",
            messages=[ChatMessage(role="user", content="how are you?")],
            max_tokens=8,
        )
        for n in range(samples)
    ]
    started = time.perf_counter()
    for request in requests:
        await api.check_submit(request)
    submit_us = (time.perf_counter() - started) / samples * 1e6
    return {"check_submit_us": round(submit_us, 2)}


def report(runs: list[Run], micro: dict[str, float]) -> tuple[str, dict[str, Any]]:
    rows = [r.row() for r in runs]
    lines = [
        "| round | chain | requests | requests/s | mean ms | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, row in enumerate(rows):
        lines.append(
            f"| {n // len(VARIANTS) + 1} | {row['chain']} | {row['requests']} | "
            f"{row['requests_per_s']} | {row['mean_ms']} | {row['p50_ms']} | {row['p95_ms']} |"
        )

    def mean_of(chain: str, field: str) -> float:
        return statistics.fmean(r[field] for r in rows if r["chain"] == chain)

    summary = {
        "off_mean_ms": round(mean_of("off", "mean_ms"), 1),
        "on_mean_ms": round(mean_of("on", "mean_ms"), 1),
        "overhead_mean_ms": round(mean_of("on", "mean_ms") - mean_of("off", "mean_ms"), 1),
        "overhead_p50_ms": round(mean_of("on", "p50_ms") - mean_of("off", "p50_ms"), 1),
        "overhead_limits_only_mean_ms": round(
            mean_of("limits", "mean_ms") - mean_of("off", "mean_ms"), 1
        ),
        "off_requests_per_s": round(mean_of("off", "requests_per_s"), 1),
        "on_requests_per_s": round(mean_of("on", "requests_per_s"), 1),
        **micro,
    }
    lines += [
        "",
        f"Per request, chain on minus off (mean over rounds): **{summary['overhead_mean_ms']} ms "
        f"mean, {summary['overhead_p50_ms']} ms p50**; throughput "
        f"{summary['off_requests_per_s']} -> {summary['on_requests_per_s']} requests/s; "
        f"limits alone: {summary['overhead_limits_only_mean_ms']} ms mean. "
        f"In-process cost of the limits step at the API (check_submit): "
        f"{micro['check_submit_us']} µs per request.",
    ]
    return "\n".join(lines), summary


async def measure(base: Settings, requests: int, concurrency: int, rounds: int) -> list[Run]:
    runs: list[Run] = []
    for _ in range(rounds):
        for variant in VARIANTS:
            settings = chain_settings(base, variant)
            runs.append(await end_to_end(settings, requests, concurrency, variant))
    return runs


def publish(
    body: str, requests: int, concurrency: int, rounds: int, command: str, load: list[float]
) -> None:
    """Append the run to docs/benchmarks.md; ``load``: the 1-minute load average at the
    start and the end (the machine may be shared)."""
    bench.record(
        "Policy chain overhead per request: `null` engine",
        f"Load average {load[0]:.1f} at the start, {load[-1]:.1f} at the end (other work "
        "shares the machine: compare rows of one run only). "
        f"Engine `null` (no model); {requests} requests per run from {concurrency} "
        f"concurrent clients (after {WARM_UP} warm-up requests), each submitted over HTTP "
        "and awaited with the long poll; chain off (no limits, cache or review) "
        "and on (limits with rpm/tpm/budget checks that never refuse, review "
        "step that never holds, response cache missing on distinct prompts), and limits "
        "(limits alone) alternate "
        f"for {rounds} rounds on one embedded broker and Postgres; broker, Postgres, "
        f"workers and load generator on this machine. Command: `{command}`.",
        body,
    )
