"""Prometheus histograms read back from the process's registry, over a sliding window.

The dashboard shows the numbers ``/metrics`` exports: it reads the same registry,
keeps a few timed snapshots of each histogram's cumulative buckets, and computes
percentiles over the difference between now and a snapshot about ``window_s``
ago (as ``histogram_quantile(q, rate(...[window]))`` does in Prometheus).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import REGISTRY
from prometheus_client.registry import CollectorRegistry

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Series:
    """One histogram series: cumulative bucket counts by upper bound, count and sum."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    sum: float

    def minus(self, older: Series | None) -> Series:
        """The observations made since ``older`` (all of them when None)."""
        if older is None or older.count > self.count:  # none, or the process restarted
            return self
        before = dict(older.buckets)
        return Series(
            buckets=tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets),
            count=self.count - older.count,
            sum=self.sum - older.sum,
        )

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile, interpolated linearly inside its bucket (None when empty).

        Past the last finite bound it answers that bound, as Prometheus does."""
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(le):
                    return lower
                inside = cumulative - below
                share = (rank - below) / inside if inside > 0 else 1.0
                return lower + (le - lower) * share
            lower, below = le, cumulative
        return lower

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def counts(self) -> list[tuple[str, float]]:
        """Observations per bucket (not cumulative), labelled ``<=le``."""
        out: list[tuple[str, float]] = []
        below = 0.0
        for le, cumulative in self.buckets:
            label = "+Inf" if math.isinf(le) else f"{le:g}"
            out.append((label, cumulative - below))
            below = cumulative
        return out


Snapshot = dict[tuple[str, Labels], Series]


def snapshot(registry: CollectorRegistry = REGISTRY, prefix: str = "kontext_") -> Snapshot:
    """Every histogram series in ``registry`` whose family name starts with ``prefix``."""
    found: Snapshot = {}
    for family in registry.collect():
        if family.type != "histogram" or not family.name.startswith(prefix):
            continue
        parts: dict[Labels, dict[str, object]] = {}
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            entry = parts.setdefault(labels, {"buckets": [], "count": 0.0, "sum": 0.0})
            if sample.name.endswith("_bucket"):
                bucket_list = entry["buckets"]
                assert isinstance(bucket_list, list)
                bucket_list.append((float(sample.labels["le"]), float(sample.value)))
            elif sample.name.endswith("_count"):
                entry["count"] = float(sample.value)
            elif sample.name.endswith("_sum"):
                entry["sum"] = float(sample.value)
        for labels, entry in parts.items():
            bucket_list = entry["buckets"]
            count, total = entry["count"], entry["sum"]
            assert isinstance(bucket_list, list)
            assert isinstance(count, float) and isinstance(total, float)
            found[(family.name, labels)] = Series(
                buckets=tuple(sorted(bucket_list)), count=count, sum=total
            )
    return found


@dataclass
class Window:
    """Timed snapshots of the registry, so figures can cover the last ``window_s``."""

    window_s: float = 60.0
    min_interval_s: float = 0.5
    registry: CollectorRegistry = REGISTRY
    _history: deque[tuple[float, Snapshot]] = field(default_factory=deque)

    def sample(self) -> Snapshot:
        """Snapshot the registry now (kept when ``min_interval_s`` has passed)."""
        now = time.monotonic()
        current = snapshot(self.registry)
        if not self._history or now - self._history[-1][0] >= self.min_interval_s:
            self._history.append((now, current))
        while len(self._history) > 1 and now - self._history[1][0] >= self.window_s:
            self._history.popleft()
        return current

    def take(self) -> tuple[Snapshot, Snapshot]:
        """The registry now, and the snapshot closest to ``window_s`` ago (the oldest
        kept: the first was taken when the process started sampling)."""
        current = self.sample()
        return current, self._history[0][1]

    async def run(self, interval_s: float = 1.0) -> None:
        """Sample every ``interval_s``, so a window is full even on a page just opened."""
        while True:
            self.sample()
            await asyncio.sleep(interval_s)
