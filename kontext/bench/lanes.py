"""``kontext bench-lanes``: interactive latency with and without a large backfill.

The same interactive probes (single-turn jobs, one at a time, each awaited over
``GET /v1/jobs/{id}?wait=``) run twice: on an idle deployment, then while a
batch of N lines (10,000 by default) runs in the background lane. Its progress
during the probes shows the engine was busy with it, and its progress in as long a
window after them (``AFTER_MIN_S`` at least, or until its last line) how fast it goes
once interactive jobs stop; then
it is cancelled, and the table says how long the cancel took to settle (the lines
the engine is running finish; those still waiting for it fail).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import orjson

from kontext.bench.scrape import scrape
from kontext.metrics import QUEUE_WAIT
from producers.backfill import create_batch
from schemas.batches import ENDED

STAGES = ("enrich", "inference")
"""The stages whose interactive queue wait the table breaks out."""
PROBE = "Name one colour of the rainbow. (probe {i})"
LINE = "Write one short sentence about the number {i}."


@dataclass
class Phase:
    name: str
    latencies_ms: list[float]
    waits_ms: dict[str, float]
    """Mean interactive queue wait per stage during the phase."""
    seconds: float
    backfill_done_during: int | None = None

    def row(self) -> str:
        lat = sorted(self.latencies_ms)
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        done = ""
        if self.backfill_done_during is not None:
            rate = self.backfill_done_during / self.seconds
            done = f"{self.backfill_done_during} ({rate:.1f}/s)"
        waits = " | ".join(f"{self.waits_ms.get(stage, 0.0):.0f}" for stage in STAGES)
        return (
            f"| {self.name} | {len(lat)} | {statistics.median(lat):.0f} | "
            f"{lat[round(0.95 * (len(lat) - 1))]:.0f} | {p99:.0f} | {max(lat):.0f} | "
            f"{waits} | {done} |"
        )


@dataclass
class Result:
    phases: list[Phase]
    after_lines: int
    """Backfill lines done in the ``after_s`` seconds after the last probe."""
    after_s: float
    """0: the backfill had ended by the last probe."""
    settled_s: float | None = None
    """Seconds from the cancel to the batch's end (None: not within ``SETTLE_S``)."""


AFTER_MIN_S = 10.0
"""The shortest window the backfill's rate is measured over once the probes stop. It
lasts as long as the probes did when they took longer: lines of many tokens end in
bursts, a micro-batch at a time, and a short window may see none end."""
POLL_S = 0.2
"""How often the bench reads the batch's progress while it waits on it."""
SETTLE_S = 300.0
"""How long the cancelled backfill is given to end before the bench stops anyway."""


def table(result: Result) -> str:
    phases = result.phases
    waits = " | ".join(f"mean wait before {stage} ms" for stage in STAGES)
    head = (
        "| interactive probes | n | p50 ms | p95 ms | p99 ms | max ms "
        f"| {waits} | backfill lines done meanwhile |\n|---|---|---|---|---|---|---|---|---|"
    )
    if result.after_s:
        after = (
            f"\nBackfill lines done in the {result.after_s:.1f} s after the last probe: "
            f"{result.after_lines} ({result.after_lines / result.after_s:.1f}/s)."
        )
    else:
        after = "\nThe backfill had ended by the last probe."
    if result.settled_s is None:
        after += f" The cancelled backfill had not ended {SETTLE_S:.0f} s after its cancel."
    else:
        after += f" The cancelled backfill ended {result.settled_s:.1f} s after its cancel."
    return "\n".join([head, *(p.row() for p in phases)]) + "\n" + after


Totals = dict[str, tuple[float, float]]
"""By stage: the interactive queue wait's (sum of seconds, count) so far."""


async def queue_waits(metrics_urls: Sequence[str]) -> Totals:
    """Interactive queue-wait totals of this process's registry plus each endpoint's."""
    families = list(QUEUE_WAIT.collect())
    for url in metrics_urls:
        families += await scrape(url)
    totals: Totals = {stage: (0.0, 0.0) for stage in STAGES}
    for family in families:
        for sample in family.samples:
            stage = sample.labels.get("stage", "")
            if stage not in totals or sample.labels.get("lane") != "interactive":
                continue
            total, count = totals[stage]
            if sample.name == "kontext_queue_wait_seconds_sum":
                totals[stage] = (total + sample.value, count)
            elif sample.name == "kontext_queue_wait_seconds_count":
                totals[stage] = (total, count + sample.value)
    return totals


def mean_waits_ms(before: Totals, after: Totals) -> dict[str, float]:
    """Mean wait per stage between two readings (0 where nothing was observed)."""
    means: dict[str, float] = {}
    for stage, (total, count) in after.items():
        total0, count0 = before.get(stage, (0.0, 0.0))
        n = count - count0
        means[stage] = 1000 * (total - total0) / n if n else 0.0
    return means


async def measured(
    http: httpx.AsyncClient,
    name: str,
    model: str,
    n: int,
    max_tokens: int,
    metrics_urls: Sequence[str],
) -> Phase:
    """A phase of n probes with the stages' mean interactive queue waits meanwhile."""
    before = await queue_waits(metrics_urls)
    started = time.monotonic()
    latencies = await probe(http, model, n, max_tokens)
    seconds = time.monotonic() - started
    waits = mean_waits_ms(before, await queue_waits(metrics_urls))
    return Phase(name, latencies, waits, seconds)


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


async def lines_within(
    http: httpx.AsyncClient, batch_id: str, done: int, lines: int, seconds: float
) -> tuple[int, float]:
    """Lines of the batch (of ``lines``, ``done`` so far) that end within ``seconds``, or
    until its last one has: (lines, seconds taken); (0, 0.0) if none was left."""
    if done >= lines:
        return 0, 0.0
    started = time.monotonic()
    now = done
    while now < lines and (left := seconds - (time.monotonic() - started)) > 0:
        await asyncio.sleep(min(POLL_S, left))
        now = await done_lines(http, batch_id)
    return now - done, time.monotonic() - started


async def cancel(http: httpx.AsyncClient, batch_id: str) -> float | None:
    """Cancel the batch and wait until it has ended: the seconds that took, or None
    after ``SETTLE_S``. A batch that ended first is not cancelled; this returns at once."""
    started = time.monotonic()
    await http.post(f"/v1/batches/{batch_id}/cancel")
    while (await http.get(f"/v1/batches/{batch_id}")).json()["status"] not in ENDED:
        if time.monotonic() - started > SETTLE_S:
            return None
        await asyncio.sleep(POLL_S)
    return time.monotonic() - started


async def run(
    http: httpx.AsyncClient,
    model: str,
    probes: int,
    lines: int,
    max_tokens: int,
    metrics_urls: Sequence[str] = (),
    line_max_tokens: int | None = None,
) -> Result:
    """Probes on an idle deployment, then during a backfill of ``lines`` lines, then the
    backfill's pace without them. ``metrics_urls``: endpoints of stages running in
    other processes; ``line_max_tokens``: the lines' own limit (the probes' if None)."""
    await probe(http, model, 3, max_tokens)  # warm-up, not measured
    idle = await measured(http, "without backfill", model, probes, max_tokens, metrics_urls)
    created = await create_batch(http, backfill_input(model, lines, line_max_tokens or max_tokens))
    created.raise_for_status()
    batch_id = created.json()["id"]
    try:
        deadline = time.monotonic() + 120
        while await done_lines(http, batch_id) == 0:  # until the background lane is busy
            if time.monotonic() > deadline:
                raise RuntimeError("the backfill did not start within 120 s")
            await asyncio.sleep(POLL_S)
        before = await done_lines(http, batch_id)
        name = f"during a {lines:,}-line backfill"
        during = await measured(http, name, model, probes, max_tokens, metrics_urls)
        probed = await done_lines(http, batch_id)
        during.backfill_done_during = probed - before
        after_lines, after_s = await lines_within(
            http, batch_id, probed, lines, max(AFTER_MIN_S, during.seconds)
        )
    finally:
        settled = await cancel(http, batch_id)
    return Result([idle, during], after_lines, after_s, settled)
