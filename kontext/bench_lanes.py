"""``kontext bench-lanes``: interactive latency with and without a large backfill.

The same interactive probes (single-turn jobs, one at a time, each awaited over
``GET /v1/jobs/{id}?wait=``) run twice: on an idle deployment, then while a
batch of N lines (10,000 by default) runs in the background lane. The batch is
cancelled once the probes are done; its progress during the probes shows the
engine was busy with it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import httpx
import orjson

PROBE = "Name one colour of the rainbow. (probe {i})"
LINE = "Write one short sentence about the number {i}."


@dataclass
class Phase:
    name: str
    latencies_ms: list[float]
    backfill_done_during: int | None = None

    def row(self) -> str:
        lat = sorted(self.latencies_ms)
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        done = "" if self.backfill_done_during is None else str(self.backfill_done_during)
        return (
            f"| {self.name} | {len(lat)} | {statistics.median(lat):.0f} | "
            f"{lat[round(0.95 * (len(lat) - 1))]:.0f} | {p99:.0f} | {max(lat):.0f} | {done} |"
        )


def table(phases: list[Phase]) -> str:
    head = (
        "| interactive probes | n | p50 ms | p95 ms | p99 ms | max ms "
        "| backfill lines done meanwhile |\n|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(p.row() for p in phases)])


async def probe(http: httpx.AsyncClient, model: str, n: int, max_tokens: int) -> list[float]:
    """Latency of n interactive jobs, submitted one after the other."""
    latencies: list[float] = []
    for i in range(n):
        started = time.perf_counter()
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROBE.format(i=i)}],
            "max_tokens": max_tokens,
        }
        submitted = await http.post("/v1/jobs", json=body)
        submitted.raise_for_status()
        job_id = submitted.json()["id"]
        while True:
            job = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
            if job["status"] in ("succeeded", "failed"):
                break
        if job["status"] != "succeeded":
            raise RuntimeError(f"probe {i} failed: {job.get('error')}")
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def backfill_input(model: str, lines: int, max_tokens: int) -> bytes:
    rows = (
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": LINE.format(i=i)}],
                "max_tokens": max_tokens,
            },
        }
        for i in range(lines)
    )
    return b"\n".join(orjson.dumps(r) for r in rows)


async def done_lines(http: httpx.AsyncClient, batch_id: str) -> int:
    counts = (await http.get(f"/v1/batches/{batch_id}")).json()["request_counts"]
    return int(counts["completed"]) + int(counts["failed"])


async def run(
    http: httpx.AsyncClient, model: str, probes: int, lines: int, max_tokens: int
) -> list[Phase]:
    """Probes on an idle deployment, then during a backfill of ``lines`` lines."""
    await probe(http, model, 3, max_tokens)  # warm-up, not measured
    idle = Phase("without backfill", await probe(http, model, probes, max_tokens))
    created = await http.post(
        "/v1/batches",
        content=backfill_input(model, lines, max_tokens),
        headers={"Content-Type": "application/jsonl"},
        timeout=120,
    )
    created.raise_for_status()
    batch_id = created.json()["id"]
    try:
        deadline = time.monotonic() + 120
        while await done_lines(http, batch_id) == 0:  # until the background lane is busy
            if time.monotonic() > deadline:
                raise RuntimeError("the backfill did not start within 120 s")
            await asyncio.sleep(0.2)
        before = await done_lines(http, batch_id)
        latencies = await probe(http, model, probes, max_tokens)
        during = Phase(f"during a {lines:,}-line backfill", latencies)
        during.backfill_done_during = await done_lines(http, batch_id) - before
    finally:
        await http.post(f"/v1/batches/{batch_id}/cancel")
    return [idle, during]
