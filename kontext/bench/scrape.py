"""Reading a child process's Prometheus metrics (the benchmarks read the inference
worker's batch sizes and queue waits from its metrics endpoint)."""

from __future__ import annotations

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


async def scrape(url: str) -> list[Metric]:
    """The metric families a Prometheus endpoint serves now."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(url)
        response.raise_for_status()
    return list(text_string_to_metric_families(response.text))
