"""Every Prometheus metric Kontext exports, defined once so dashboards read the same names.

The API serves them at ``GET /metrics``; a worker run on its own (``kontext
worker NAME``) serves them on ``KONTEXT_METRICS_PORT``. ``kontext up`` runs
every service in one process, so its API's ``/metrics`` shows them all.
Counters appear with the ``_total`` suffix; histograms with ``_bucket``,
``_sum`` and ``_count``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from kontext.ports import METRICS_PORT, cannot_listen

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""Seconds: API calls are milliseconds, a turn through a CPU model is seconds."""

HTTP_REQUESTS = Counter(
    "kontext_http_requests",
    "API requests by route template, method and status code",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "kontext_http_request_duration_seconds",
    "API request handling time by route template and method",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "kontext_queue_wait_seconds",
    "Time a job waited before a stage took it: 'enrich' from submission to the enricher, "
    "'inference' from enrichment to the inference worker; by lane (interactive, background)",
    ["stage", "lane"],
    buckets=LATENCY_BUCKETS,
)
BACKGROUND_PAUSED = Counter(
    "kontext_background_paused_seconds",
    "Seconds background-lane model calls were paused so interactive jobs found the cores "
    "free (workers/pacing.py; per process)",
)
ENRICHMENT_LATENCY = Histogram(
    "kontext_enrichment_duration_seconds",
    "Enricher micro-batch handling time (order gate, memory lookup, prompt assembly)",
    buckets=LATENCY_BUCKETS,
)
ENGINE_LATENCY = Histogram(
    "kontext_engine_duration_seconds",
    "One engine call (one micro-batch) by model",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
E2E_LATENCY = Histogram(
    "kontext_job_duration_seconds",
    "End to end: submission until the result is recorded, by model, final status and "
    "lane (interactive, background)",
    ["model", "status", "lane"],
    buckets=LATENCY_BUCKETS,
)
PREFIX_CACHED_TOKENS = Counter(
    "kontext_engine_prefix_cached_tokens",
    "Prompt tokens the engine took from its prefix cache instead of computing"
    " (vllm; smollm2 with continuous batching)",
    ["model"],
)
BATCH_SIZE = Histogram(
    "kontext_inference_batch_size",
    "Requests per engine call",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ENGINE_REQUESTS = Counter(
    "kontext_engine_requests",
    "Requests an engine generated an answer for (cache hits are not counted)",
    ["model"],
)
TOKENS = Counter(
    "kontext_tokens",
    "Tokens through the engines by model and kind (prompt, completion); "
    "tokens/s is rate(kontext_tokens_total[1m])",
    ["model", "kind"],
)
CACHE_LOOKUPS = Counter(
    "kontext_cache_lookups",
    "Response cache lookups of deterministic requests by model and result (hit, miss); "
    "hit rate is hit / (hit + miss)",
    ["model", "result"],
)
CONSUMER_LAG = Gauge(
    "kontext_consumer_lag",
    "Messages a consumer is behind its partition's high watermark, after its last batch",
    ["consumer", "topic", "partition"],
)
DEAD_LETTERS = Counter(
    "kontext_dead_letters",
    "Messages dead-lettered, by source topic, consumer and reason code",
    ["topic", "consumer", "reason"],
)
REVIEW_HELD = Counter(
    "kontext_review_held",
    "Results held for human review, by model and reason (logprob, pattern)",
    ["model", "reason"],
)
REVIEW_DECISIONS = Counter(
    "kontext_review_decisions",
    "Reviewer decisions on held results, by action (approve, replace)",
    ["action"],
)

_WORD = re.compile(r"[A-Za-z_]+")


def reason_code(reason: str) -> str:
    """A bounded label from a free-text reason: the words before the first colon,
    without ids or numbers (``JobCompletion for unknown job 3f2a…`` gives
    ``jobcompletion_for_unknown_job``)."""
    head = reason.split(":", 1)[0]
    words = [w.lower() for w in head.split() if _WORD.fullmatch(w)]
    return "_".join(words)[:48] or "other"


def observe_lag(consumer: str, topic: str, partition: int, highwater: int | None, end: int) -> None:
    """Record how far ``end`` (the next offset to handle) is behind ``highwater``."""
    if highwater is not None:
        CONSUMER_LAG.labels(consumer, topic, str(partition)).set(max(highwater - end, 0))


def observe_waits(stage: str, since: Iterable[tuple[datetime, str]]) -> None:
    """Observe, for each job (the moment its wait began, its lane), the queue wait until
    now at ``stage``."""
    now = datetime.now(UTC)
    lanes: dict[str, Histogram] = {}  # each lane's series looked up once per call
    for moment, lane in since:
        series = lanes.get(lane)
        if series is None:
            series = lanes[lane] = QUEUE_WAIT.labels(stage, lane)
        series.observe(max((now - moment).total_seconds(), 0.0))


def serve(port: int | None, host: str = "127.0.0.1") -> int | None:
    """Serve every metric over HTTP on ``port`` (0: any free one), for a worker that runs
    without the API; the bound port, or None when ``port`` is None. CannotListen if
    it cannot be bound."""
    if port is None:
        return None
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        raise cannot_listen(host, port, METRICS_PORT, exc) from None
    bound: int = server.server_address[1]
    return bound
