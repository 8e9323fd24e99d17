"""The dashboard's percentiles from Prometheus histogram buckets, over a window."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from producers.api.dashboard.histograms import Window, snapshot


def _histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "kontext_test_seconds", "test", ["stage"], buckets=(0.1, 0.5, 1.0), registry=registry
    )


def test_quantiles_interpolate_inside_the_bucket_like_prometheus() -> None:
    registry = CollectorRegistry()
    latency = _histogram(registry)
    for value in (0.05, 0.2, 0.3, 0.4, 0.7, 5.0):
        latency.labels("engine").observe(value)
    series = snapshot(registry)[("kontext_test_seconds", (("stage", "engine"),))]
    assert series.count == 6
    # rank 3 of 6 falls in (0.1, 0.5], which holds 3 observations after 1 below it.
    assert series.quantile(0.5) == pytest.approx(0.1 + 0.4 * (3 - 1) / 3)
    # Past the last finite bound, the answer is that bound.
    assert series.quantile(0.99) == 1.0
    assert series.counts() == [("0.1", 1), ("0.5", 3), ("1", 1), ("+Inf", 1)]
    assert series.mean() == pytest.approx(6.65 / 6)


def test_window_counts_only_what_was_observed_since_its_oldest_snapshot() -> None:
    registry = CollectorRegistry()
    latency = _histogram(registry)
    latency.labels("engine").observe(0.9)
    window = Window(window_s=60, min_interval_s=0, registry=registry)
    window.sample()
    for _ in range(4):
        latency.labels("engine").observe(0.05)
    now, before = window.take()
    key = ("kontext_test_seconds", (("stage", "engine"),))
    recent = now[key].minus(before.get(key))
    assert recent.count == 4
    assert recent.quantile(0.99) == pytest.approx(0.099)
    assert now[key].count == 5
    assert snapshot(CollectorRegistry()) == {}
