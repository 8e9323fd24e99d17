"""Read a running stack's Prometheus ``/metrics`` the way Prometheus does (text format)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack


class Scrape:
    """One scrape: samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        """The sum of ``sample`` over series whose labels include ``labels`` (0 if none)."""
        total = 0.0
        for family in self.families.values():
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def labels(self, sample: str) -> list[dict[str, str]]:
        return [s.labels for f in self.families.values() for s in f.samples if s.name == sample]


async def scrape(stack: Stack) -> Scrape:
    """Scrape the session stack's API with an operator key (``/metrics`` needs one)."""
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=stack.operator_headers, timeout=30
    ) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)
